import Foundation

extension Kernels {
    static let geluScale: Float = (2 / Float.pi).squareRoot()

    /// GELU, tanh form (`gelu_new`): 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))). `out` may alias `inp`.
    public static func geluForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, count: Int) {
        let k = FastMath.V(repeating: geluScale), c = FastMath.V(repeating: 0.044715), half = FastMath.V(repeating: 0.5)
        Parallel.forChunks(count, costPerItem: 16) { r in
            FastMath.map(out + r.lowerBound, inp + r.lowerBound, count: r.count) { x in
                let inner: FastMath.V = k * (x + c * x * x * x)
                return half * x * (1 + FastMath.tanh(inner))
            }
        }
    }

    /// dinp += dout · GELU'(inp)
    public static func geluBackward(dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, count: Int) {
        let k = FastMath.V(repeating: geluScale), c = FastMath.V(repeating: 0.044715), c3 = FastMath.V(repeating: 3 * 0.044715)
        let half = FastMath.V(repeating: 0.5)
        Parallel.forChunks(count, costPerItem: 20) { r in
            FastMath.accumulate(dinp + r.lowerBound, inp + r.lowerBound, dout + r.lowerBound, count: r.count) { x, g in
                let x2: FastMath.V = x * x
                let inner: FastMath.V = k * (x + c * x2 * x)
                let t: FastMath.V = FastMath.tanh(inner)
                let sech2: FastMath.V = 1 - t * t
                let slope: FastMath.V = k * (1 + c3 * x2)
                let local: FastMath.V = half * (1 + t) + half * x * sech2 * slope
                return local * g
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
