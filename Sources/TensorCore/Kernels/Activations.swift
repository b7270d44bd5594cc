import Foundation

extension Kernels {
    static let geluScale: Float = (2 / Float.pi).squareRoot()

    /// GELU, tanh form (`gelu_new`): 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))). `out` may alias `inp`.
    public static func geluForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count, costPerItem: 16) { r in
            for i in r {
                let x = inp[i]
                let cube = 0.044715 * x * x * x
                out[i] = 0.5 * x * (1 + tanhf(geluScale * (x + cube)))
            }
        }
    }

    /// dinp += dout · GELU'(inp)
    public static func geluBackward(dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count, costPerItem: 20) { r in
            for i in r {
                let x = inp[i]
                let cube = 0.044715 * x * x * x
                let t = tanhf(geluScale * (x + cube))
                let sech2 = 1 - t * t
                let local = 0.5 * (1 + t) + x * 0.5 * sech2 * geluScale * (1 + 3 * 0.044715 * x * x)
                dinp[i] += local * dout[i]
            }
        }
    }

    /// SiLU: x·σ(x). `out` may alias `inp`.
    public static func siluForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count, costPerItem: 12) { r in
            for i in r { let x = inp[i]; out[i] = x / (1 + expf(-x)) }
        }
    }

    /// dinp += dout · σ(x)(1 + x(1 − σ(x)))
    public static func siluBackward(dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count, costPerItem: 14) { r in
            for i in r {
                let x = inp[i]
                let s = 1 / (1 + expf(-x))
                dinp[i] += dout[i] * s * (1 + x * (1 - s))
            }
        }
    }

    /// SwiGLU: out = silu(gate) · up (Llama's MLP), elementwise.
    public static func swigluForward(_ out: UnsafeMutablePointer<Float>, gate: UnsafePointer<Float>, up: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count, costPerItem: 12) { r in
            for i in r { let g = gate[i]; out[i] = g / (1 + expf(-g)) * up[i] }
        }
    }

    /// Adds SwiGLU gradients into dgate and dup.
    public static func swigluBackward(
        dgate: UnsafeMutablePointer<Float>, dup: UnsafeMutablePointer<Float>,
        dout: UnsafePointer<Float>, gate: UnsafePointer<Float>, up: UnsafePointer<Float>, count: Int
    ) {
        Parallel.forChunks(count, costPerItem: 16) { r in
            for i in r {
                let g = gate[i]
                let s = 1 / (1 + expf(-g))
                let silu = g * s
                dup[i] += dout[i] * silu
                dgate[i] += dout[i] * up[i] * s * (1 + g * (1 - s))
            }
        }
    }

    /// ReLU. `out` may alias `inp`.
    public static func reluForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count, costPerItem: 2) { r in for i in r { out[i] = max(inp[i], 0) } }
    }

    /// dinp += dout where inp > 0.
    public static func reluBackward(dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, count: Int) {
        Parallel.forChunks(count, costPerItem: 2) { r in for i in r where inp[i] > 0 { dinp[i] += dout[i] } }
    }

    /// Clamp to [lo, hi]. `out` may alias `inp`.
    public static func clampForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, lo: Float, hi: Float, count: Int) {
        Parallel.forChunks(count, costPerItem: 2) { r in for i in r { out[i] = min(max(inp[i], lo), hi) } }
    }

    /// dinp += dout where lo ≤ inp ≤ hi (the PyTorch convention: gradient passes at the bounds).
    public static func clampBackward(dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, lo: Float, hi: Float, count: Int) {
        Parallel.forChunks(count, costPerItem: 2) { r in
            for i in r where inp[i] >= lo && inp[i] <= hi { dinp[i] += dout[i] }
        }
    }
}
