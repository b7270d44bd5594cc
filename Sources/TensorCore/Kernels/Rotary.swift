import Foundation

/// Rotary position embedding tables in the Hugging Face "rotate half" layout.
public struct RotaryTable: Sendable {
    public let headDim: Int
    public let maxPositions: Int
    /// cos and sin, [maxPositions, headDim/2] (the two halves of HF's table are equal).
    public let cos: [Float]
    public let sin: [Float]

    /// Frequencies as HF computes them in float32: inv_freq[i] = 1 / θ^(2i/d), angle = pos · inv_freq[i].
    public init(headDim: Int, maxPositions: Int, theta: Float = 10000) {
        precondition(headDim % 2 == 0, "rotary head dimension must be even")
        self.headDim = headDim
        self.maxPositions = maxPositions
        let half = headDim / 2
        var c = [Float](repeating: 0, count: maxPositions * half)
        var s = c
        for i in 0..<half {
            let invFreq: Float = 1 / powf(theta, Float(2 * i) / Float(headDim))
            for p in 0..<maxPositions {
                let angle = Float(p) * invFreq
                c[p * half + i] = Float(Foundation.cos(Double(angle)))
                s[p * half + i] = Float(Foundation.sin(Double(angle)))
            }
        }
        cos = c
        sin = s
    }
}

extension Kernels {
    /// Rotates, in place, `heads` vectors of `table.headDim` at each of N positions.
    /// x: N rows of `stride` elements, the heads packed at the start of each row; positions: [N].
    /// `inverse` applies the transpose rotation (the backward pass of the forward rotation).
    public static func rotary(
        _ x: UnsafeMutablePointer<Float>, positions: UnsafePointer<Int32>, table: RotaryTable,
        N: Int, heads: Int, stride: Int, inverse: Bool = false
    ) {
        let half = table.headDim / 2
        let sign: Float = inverse ? -1 : 1
        table.cos.withUnsafeBufferPointer { cosT in
            table.sin.withUnsafeBufferPointer { sinT in
                let cb = cosT.baseAddress!, sb = sinT.baseAddress!
                Parallel.forChunks(N, costPerItem: heads * table.headDim * 3) { range in
                    for n in range {
                        let pos = Int(positions[n])
                        precondition(pos >= 0 && pos < table.maxPositions, "position \(pos) beyond the rotary table")
                        let c = cb + pos * half, s = sb + pos * half
                        for h in 0..<heads {
                            let v = x + n * stride + h * table.headDim
                            for i in 0..<half {
                                let a = v[i], b = v[i + half]
                                let si = sign * s[i]
                                v[i] = a * c[i] - b * si
                                v[i + half] = b * c[i] + a * si
                            }
                        }
                    }
                }
            }
        }
    }
}
