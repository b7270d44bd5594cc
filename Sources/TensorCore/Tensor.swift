import Foundation

/// Aligned, zero-initialised Float32 storage shared by tensors and their views.
/// Reference semantics: a `Tensor` and its views write the same memory (as in PyTorch); call `copy()`
/// for an independent tensor.
public final class TensorStorage: @unchecked Sendable {
    public let pointer: UnsafeMutablePointer<Float>
    public let count: Int
    /// Elements written by `Tensor.appendingRows` so far (−1: not a growable buffer). Only the view that
    /// ends there may grow in place, so older views of the same storage never see their rows change.
    var appendEnd = -1

    /// `zeroed: false` leaves the values as the allocator gives them: only for storage whose every
    /// element is written before any is read.
    public init(count: Int, zeroed: Bool = true) {
        precondition(count >= 0, "negative element count")
        self.count = count
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * MemoryLayout<Float>.stride, alignment: 64)
        pointer = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        if zeroed { pointer.initialize(repeating: 0, count: max(count, 1)) }
    }

    deinit { UnsafeMutableRawPointer(pointer).deallocate() }
}

/// A contiguous row-major Float32 tensor: storage, an element offset into it, and a shape.
public struct Tensor: @unchecked Sendable, CustomStringConvertible {
    public let storage: TensorStorage
    public let offset: Int
    public let shape: [Int]

    /// Zeros of the given shape.
    public init(shape: [Int]) {
        let n = shape.reduce(1, *)
        self.storage = TensorStorage(count: n)
        self.offset = 0
        self.shape = shape
    }

    /// A tensor of the given shape whose values are not set: every element must be written before any is
    /// read (outputs that a kernel fills whole, copies). Saves the zeroing pass, which for large outputs
    /// costs as much as writing them.
    public init(uninitializedShape shape: [Int]) {
        self.storage = TensorStorage(count: shape.reduce(1, *), zeroed: false)
        self.offset = 0
        self.shape = shape
    }

    public init(shape: [Int], repeating value: Float) {
        self.init(shape: shape)
        data.update(repeating: value, count: count)
    }

    public init(shape: [Int], values: [Float]) {
        precondition(shape.reduce(1, *) == values.count, "shape \(shape) does not hold \(values.count) values")
        self.init(shape: shape)
        values.withUnsafeBufferPointer { data.update(from: $0.baseAddress!, count: values.count) }
    }

    public init(storage: TensorStorage, offset: Int, shape: [Int]) {
        precondition(offset >= 0 && offset + shape.reduce(1, *) <= storage.count, "view out of storage bounds")
        self.storage = storage
        self.offset = offset
        self.shape = shape
    }

    public var count: Int { shape.reduce(1, *) }
    public var rank: Int { shape.count }
    public var data: UnsafeMutablePointer<Float> { storage.pointer + offset }
    public var buffer: UnsafeMutableBufferPointer<Float> { UnsafeMutableBufferPointer(start: data, count: count) }

    /// Size of dimension `i` (negative counts from the end).
    public func dim(_ i: Int) -> Int { shape[i < 0 ? shape.count + i : i] }

    /// Same memory, another shape (the element count must match).
    public func reshaped(_ newShape: [Int]) -> Tensor {
        precondition(newShape.reduce(1, *) == count, "cannot reshape \(shape) to \(newShape)")
        return Tensor(storage: storage, offset: offset, shape: newShape)
    }

    /// A view of rows `range` along the first dimension.
    public func rows(_ range: Range<Int>) -> Tensor {
        precondition(rank >= 1 && range.lowerBound >= 0 && range.upperBound <= shape[0], "rows \(range) out of \(shape)")
        let inner = shape.dropFirst().reduce(1, *)
        return Tensor(storage: storage, offset: offset + range.lowerBound * inner,
                      shape: [range.count] + shape.dropFirst())
    }

    /// A view of row `i` along the first dimension, with that dimension dropped.
    public func row(_ i: Int) -> Tensor { rows(i..<(i + 1)).reshaped(Array(shape.dropFirst())) }

    /// Columns `range` of a [N, C] value, as a new [N, range.count] tensor.
    public func columnSlice(_ range: Range<Int>) -> Tensor {
        let C = shape.last!, N = count / max(C, 1), W = range.count
        precondition(range.lowerBound >= 0 && range.upperBound <= C, "columns \(range) out of \(shape)")
        let out = Tensor(uninitializedShape: [N, W])
        for n in 0..<N { (out.data + n * W).update(from: data + n * C + range.lowerBound, count: W) }
        return out
    }

    /// The rows of `parts` stacked in order ([N1, C] ++ [N2, C] → [N1 + N2, C]), one new tensor.
    public static func concatenatingRows(_ parts: [Tensor]) -> Tensor {
        precondition(!parts.isEmpty, "concatenatingRows: no tensors")
        let C = parts[0].shape.last!
        let out = Tensor(uninitializedShape: [parts.reduce(0) { $0 + $1.count } / max(C, 1), C])
        var at = 0
        for p in parts { (out.data + at).update(from: p.data, count: p.count); at += p.count }
        return out
    }

    /// `self`'s rows followed by `rows`'s ([N, C] + [M, C] → [N + M, C]). Amortised O(M): when `self` is the
    /// latest view of a growable buffer with room, the new rows are written after it and a longer view is
    /// returned (`self` and older views are unchanged); otherwise a buffer with twice the room is made.
    public func appendingRows(_ rows: Tensor) -> Tensor {
        let C = rows.shape.last!
        precondition(count % max(C, 1) == 0 && (shape.last ?? C) == C || count == 0, "appendingRows: \(shape) + \(rows.shape)")
        let n = count / max(C, 1), m = rows.count / max(C, 1)
        let need = count + rows.count
        if offset == 0 && storage.appendEnd == count && need <= storage.count {
            (storage.pointer + count).update(from: rows.data, count: rows.count)
            storage.appendEnd = need
            return Tensor(storage: storage, offset: 0, shape: [n + m, C])
        }
        // The room after `need` is written by later appends before any view covers it.
        let grown = TensorStorage(count: max(need, 2 * count, 64 * C), zeroed: false)
        grown.pointer.update(from: data, count: count)
        (grown.pointer + count).update(from: rows.data, count: rows.count)
        grown.appendEnd = need
        return Tensor(storage: grown, offset: 0, shape: [n + m, C])
    }

    /// An independent copy.
    public func copy() -> Tensor {
        let t = Tensor(uninitializedShape: shape)
        t.data.update(from: data, count: count)
        return t
    }

    public func fill(_ value: Float) { data.update(repeating: value, count: count) }
    public func zero() { fill(0) }

    /// Copies the values of `other` (same element count) into this tensor.
    public func assign(_ other: Tensor) {
        precondition(other.count == count, "assign: \(other.shape) into \(shape)")
        data.update(from: other.data, count: count)
    }

    public var array: [Float] { Array(buffer) }

    public subscript(_ i: Int) -> Float {
        get { data[i] }
        nonmutating set { data[i] = newValue }
    }

    public subscript(_ i: Int, _ j: Int) -> Float {
        get { data[i * shape[1] + j] }
        nonmutating set { data[i * shape[1] + j] = newValue }
    }

    public var description: String {
        let head = array.prefix(8).map { String(format: "%.4g", $0) }.joined(separator: ", ")
        return "Tensor(\(shape), [\(head)\(count > 8 ? ", …" : "")])"
    }
}
