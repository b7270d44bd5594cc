import XCTest
@testable import TensorCore

/// Finite-difference gradient checking.
///
/// The loss is L = Σ out ⊙ probe with a fixed random probe, accumulated in Float64. Numeric gradients
/// are central differences of the Float32 forward with step `h`; the analytic gradient passes when
/// max |numeric − analytic| ≤ rtol · max |analytic| + atol for every input.
/// Default tolerances (h = 1e-2, rtol = 1e-2, atol = 2e-3) sit above the truncation error O(h²) and
/// the Float32 round-off of the forward (≈ 1e-7·|L| / h) for the O(1)-sized tensors used here.
struct GradCheck {
    var h: Float = 1e-2
    var rtol: Float = 1e-2
    var atol: Float = 2e-3

    static func loss(_ out: Tensor, _ probe: Tensor) -> Double {
        var s: Double = 0
        for i in 0..<out.count { s += Double(out[i]) * Double(probe[i]) }
        return s
    }

    /// `forward(inputs)` returns the output; `backward(inputs, dout)` returns ∂L/∂input for the inputs
    /// to check (nil for inputs without a gradient). Inputs may be perturbed in place.
    func check(
        _ name: String, inputs: [Tensor], seed: UInt64 = 7,
        forward: ([Tensor]) -> Tensor, backward: ([Tensor], Tensor) -> [Tensor?],
        file: StaticString = #filePath, line: UInt = #line
    ) {
        var rng = RNG(seed: seed)
        let out0 = forward(inputs)
        let probe = Tensor.randn(out0.shape, rng: &rng)
        let grads = backward(inputs, probe)
        XCTAssertEqual(grads.count, inputs.count, "\(name): one gradient slot per input", file: file, line: line)
        for (k, (x, g)) in zip(inputs, grads).enumerated() {
            guard let g else { continue }
            XCTAssertEqual(g.count, x.count, "\(name): gradient \(k) shape", file: file, line: line)
            var maxErr: Float = 0
            for i in 0..<x.count {
                let saved = x[i]
                x[i] = saved + h
                let lp = Self.loss(forward(inputs), probe)
                x[i] = saved - h
                let lm = Self.loss(forward(inputs), probe)
                x[i] = saved
                let num = Float((lp - lm) / Double(2 * h))
                maxErr = max(maxErr, abs(num - g[i]))
            }
            let bound = rtol * g.maxAbs() + atol
            XCTAssertLessThanOrEqual(maxErr, bound, "\(name): input \(k) max |numeric − analytic| = \(maxErr) (bound \(bound))",
                                     file: file, line: line)
        }
    }

    /// Gradient check of a graph built on a `Tape` from variables of the given inputs.
    func checkTape(
        _ name: String, inputs: [Tensor], seed: UInt64 = 7, needsGrad: [Bool]? = nil,
        build: (Tape, [Variable]) -> Variable, file: StaticString = #filePath, line: UInt = #line
    ) {
        let flags = needsGrad ?? Array(repeating: true, count: inputs.count)
        check(name, inputs: inputs, seed: seed, forward: { xs in
            let tape = Tape()
            return build(tape, xs.map { tape.leaf($0) }).value.copy()
        }, backward: { xs, probe in
            let tape = Tape()
            let vars = zip(xs, flags).map { tape.leaf($0, requiresGrad: $1) }
            let out = build(tape, vars)
            tape.backward(seeds: [(out, probe)])
            return zip(vars, flags).map { $1 ? $0.grad : nil }
        }, file: file, line: line)
    }
}

func randn(_ shape: [Int], _ rng: inout RNG, std: Float = 1) -> Tensor { Tensor.randn(shape, std: std, rng: &rng) }
