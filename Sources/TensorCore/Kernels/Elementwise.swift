import Foundation

extension Kernels {
    /// out = a + b. `out` may alias either input.
    public static func add(_ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count) { r in for i in r { out[i] = a[i] + b[i] } }
    }

    /// out = a ⊙ b. `out` may alias either input.
    public static func mul(_ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count) { r in for i in r { out[i] = a[i] * b[i] } }
    }

    /// y += a ⊙ b
    public static func addProduct(_ y: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count, costPerItem: 2) { r in for i in r { y[i] += a[i] * b[i] } }
    }

    /// y += x (parallel for large buffers).
    public static func accumulate(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count) { r in for i in r { y[i] += x[i] } }
    }

    /// Sum of squares in Float64.
    public static func sumOfSquares(_ x: UnsafePointer<Float>, count: Int) -> Double {
        var s: Double = 0
        for i in 0..<count { let v = Double(x[i]); s += v * v }
        return s
    }
}

extension Tensor {
    /// A new tensor: self + other (same element count).
    public static func + (a: Tensor, b: Tensor) -> Tensor {
        precondition(a.count == b.count, "+: \(a.shape) and \(b.shape)")
        let out = Tensor(shape: a.shape)
        Kernels.add(out.data, a.data, b.data, count: a.count)
        return out
    }

    /// A new tensor: self − other (same element count).
    public static func - (a: Tensor, b: Tensor) -> Tensor {
        precondition(a.count == b.count, "-: \(a.shape) and \(b.shape)")
        let out = a.copy()
        BLAS.axpy(out.data, b.data, count: a.count, alpha: -1)
        return out
    }

    /// A new tensor: self · k.
    public static func * (a: Tensor, k: Float) -> Tensor {
        let out = a.copy()
        BLAS.scal(out.data, count: out.count, alpha: k)
        return out
    }

    /// self += other · alpha, in place.
    public func add(_ other: Tensor, alpha: Float = 1) {
        precondition(other.count == count, "add: \(other.shape) into \(shape)")
        BLAS.axpy(data, other.data, count: count, alpha: alpha)
    }

    /// self ·= k, in place.
    public func scale(_ k: Float) { BLAS.scal(data, count: count, alpha: k) }

    public func sum() -> Float {
        var s: Double = 0
        for i in 0..<count { s += Double(data[i]) }
        return Float(s)
    }

    public var norm: Float { Float(Kernels.sumOfSquares(data, count: count).squareRoot()) }

    public func maxAbs() -> Float {
        var m: Float = 0
        for i in 0..<count { m = max(m, abs(data[i])) }
        return m
    }

    /// Largest |self − other|.
    public func maxAbsDifference(_ other: Tensor) -> Float {
        precondition(other.count == count, "compare: \(shape) vs \(other.shape)")
        var m: Float = 0
        for i in 0..<count { m = max(m, abs(data[i] - other.data[i])) }
        return m
    }

    /// 2-D transpose, a new tensor.
    public func transposed() -> Tensor {
        precondition(rank == 2, "transposed needs a 2-D tensor")
        let R = shape[0], C = shape[1]
        let out = Tensor(shape: [C, R])
        for r in 0..<R { for c in 0..<C { out.data[c * R + r] = data[r * C + c] } }
        return out
    }

    /// Index of the largest value in each row of the last dimension.
    public func argmaxRows() -> [Int] {
        let C = shape.last ?? 1
        let N = count / max(C, 1)
        var out = [Int](repeating: 0, count: N)
        for n in 0..<N {
            let row = data + n * C
            var best = 0
            for c in 1..<max(C, 1) where row[c] > row[best] { best = c }
            out[n] = best
        }
        return out
    }
}
