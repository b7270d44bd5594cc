import Foundation

/// A parameter and its gradient buffer (same shape). Optimizers update `value` from `grad`.
public struct Parameter: @unchecked Sendable {
    public let name: String
    public let value: Tensor
    public let grad: Tensor
    /// Weight decay applies only where this is true (conventionally matrices, not biases or norms).
    public let decay: Bool

    public init(name: String, value: Tensor, grad: Tensor? = nil, decay: Bool? = nil) {
        self.name = name
        self.value = value
        self.grad = grad ?? Tensor(shape: value.shape)
        self.decay = decay ?? (value.rank >= 2)
    }
}

/// Scales every gradient so that their global L2 norm is at most `maxNorm`; returns the norm before clipping.
@discardableResult
public func clipGradNorm(_ params: [Parameter], maxNorm: Float) -> Float {
    var ss: Double = 0
    for p in params { ss += Kernels.sumOfSquares(p.grad.data, count: p.grad.count) }
    let norm = Float(ss.squareRoot())
    if maxNorm > 0, norm > maxNorm, norm.isFinite {
        let k = maxNorm / (norm + 1e-6)
        for p in params { p.grad.scale(k) }
    }
    return norm
}

/// Adam with decoupled weight decay (AdamW, Loshchilov & Hutter); `weightDecay = 0` is plain Adam.
/// The moment buffers are exposed so a trainer can checkpoint and resume exactly.
public final class AdamW: @unchecked Sendable {
    public var learningRate: Float
    public let beta1: Float, beta2: Float, eps: Float
    public var weightDecay: Float
    public private(set) var step: Int = 0
    public let params: [Parameter]
    public let m: [Tensor]
    public let v: [Tensor]

    public init(params: [Parameter], learningRate: Float, beta1: Float = 0.9, beta2: Float = 0.999,
                eps: Float = 1e-8, weightDecay: Float = 0) {
        self.params = params
        self.learningRate = learningRate
        self.beta1 = beta1; self.beta2 = beta2; self.eps = eps
        self.weightDecay = weightDecay
        m = params.map { Tensor(shape: $0.value.shape) }
        v = params.map { Tensor(shape: $0.value.shape) }
    }

    /// Restores the step counter (with `m`/`v` contents) when resuming.
    public func restore(step: Int) { self.step = step }

    /// One update from the current gradients (does not zero them).
    public func update() {
        step += 1
        let b1 = beta1, b2 = beta2, lr = learningRate, e = eps
        let c1 = 1 - powf(b1, Float(step)), c2 = 1 - powf(b2, Float(step))
        for (i, p) in params.enumerated() {
            let w = p.value.data, g = p.grad.data, mm = m[i].data, vv = v[i].data
            let wd = p.decay ? weightDecay : 0
            Parallel.forChunks(p.value.count, costPerItem: 10) { r in
                for j in r {
                    let gj = g[j]
                    mm[j] = b1 * mm[j] + (1 - b1) * gj
                    vv[j] = b2 * vv[j] + (1 - b2) * gj * gj
                    let mhat = mm[j] / c1, vhat = vv[j] / c2
                    w[j] -= lr * (mhat / (vhat.squareRoot() + e) + wd * w[j])
                }
            }
        }
    }

    public func zeroGrad() { for p in params { p.grad.zero() } }
}

/// Linear warm-up then cosine decay to `minLR` (the schedule of GPT-2/nanoGPT training).
public struct CosineSchedule: Sendable, Codable {
    public var maxLR: Float, minLR: Float, warmupSteps: Int, totalSteps: Int

    public init(maxLR: Float, minLR: Float, warmupSteps: Int, totalSteps: Int) {
        self.maxLR = maxLR; self.minLR = minLR; self.warmupSteps = warmupSteps; self.totalSteps = totalSteps
    }

    public func learningRate(step: Int) -> Float {
        if step < warmupSteps { return maxLR * Float(step + 1) / Float(max(warmupSteps, 1)) }
        if step >= totalSteps { return minLR }
        let ratio = Float(step - warmupSteps) / Float(max(totalSteps - warmupSteps, 1))
        return minLR + 0.5 * (1 + cosf(.pi * ratio)) * (maxLR - minLR)
    }
}
