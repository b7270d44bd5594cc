import Foundation

/// A seeded xoshiro256** generator: the same seed gives the same stream on every machine.
public struct RNG: RandomNumberGenerator, Sendable {
    private var s: (UInt64, UInt64, UInt64, UInt64)
    private var spareNormal: Float?

    public init(seed: UInt64) {
        var x = seed
        func splitmix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0; s.3 ^= s.1; s.1 ^= s.2; s.0 ^= s.3
        s.2 ^= t
        s.3 = (s.3 << 45) | (s.3 >> 19)
        return result
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    public mutating func uniform() -> Float { Float(next() >> 40) * (1.0 / 16_777_216.0) }

    /// Uniform in [lo, hi).
    public mutating func uniform(_ lo: Float, _ hi: Float) -> Float { lo + (hi - lo) * uniform() }

    /// Standard normal (Box–Muller, the second value kept for the next call).
    public mutating func normal() -> Float {
        if let v = spareNormal { spareNormal = nil; return v }
        var u1 = Double(next() >> 11) * (1.0 / 9_007_199_254_740_992.0)
        if u1 < 1e-300 { u1 = 1e-300 }
        let u2 = Double(next() >> 11) * (1.0 / 9_007_199_254_740_992.0)
        let r = (-2 * Foundation.log(u1)).squareRoot()
        spareNormal = Float(r * Foundation.sin(2 * .pi * u2))
        return Float(r * Foundation.cos(2 * .pi * u2))
    }

    /// A uniformly chosen index in 0..<n.
    public mutating func index(_ n: Int) -> Int {
        precondition(n > 0, "index of an empty range")
        return Int(next() % UInt64(n))
    }

    /// A uniformly chosen element.
    public mutating func choice<T>(_ items: [T]) -> T { items[index(items.count)] }

    /// An index drawn with the given non-negative weights.
    public mutating func choice(weights: [Double]) -> Int {
        let total = weights.reduce(0, +)
        precondition(total > 0, "weights sum to zero")
        var r = Double(next() >> 11) * (1.0 / 9_007_199_254_740_992.0) * total
        for (i, w) in weights.enumerated() {
            r -= w
            if r < 0 { return i }
        }
        return weights.count - 1
    }

    /// Fisher–Yates shuffle, deterministic for a seed.
    public mutating func shuffle<T>(_ items: inout [T]) {
        if items.count < 2 { return }
        for i in stride(from: items.count - 1, to: 0, by: -1) {
            items.swapAt(i, index(i + 1))
        }
    }
}

extension Tensor {
    /// Normal(0, std²) values from a seeded generator.
    public static func randn(_ shape: [Int], std: Float = 1, rng: inout RNG) -> Tensor {
        let t = Tensor(shape: shape)
        for i in 0..<t.count { t.data[i] = rng.normal() * std }
        return t
    }

    /// Uniform [lo, hi) values from a seeded generator.
    public static func uniform(_ shape: [Int], _ lo: Float, _ hi: Float, rng: inout RNG) -> Tensor {
        let t = Tensor(shape: shape)
        for i in 0..<t.count { t.data[i] = rng.uniform(lo, hi) }
        return t
    }
}

/// 64-bit FNV-1a: a hash that is the same in every process and on every machine (Swift's `Hasher` is
/// seeded per process), for picks and cache keys that must repeat.
public struct FNV1a: Sendable {
    public private(set) var value: UInt64

    public init(basis: UInt64 = 0xcbf2_9ce4_8422_2325) { value = basis }

    public mutating func mix<S: Sequence>(_ bytes: S) where S.Element == UInt8 {
        for b in bytes { value = (value ^ UInt64(b)) &* 0x100_0000_01b3 }
    }

    /// An integer's eight bytes, least significant first.
    public mutating func mix(_ x: Int) {
        var v = UInt64(bitPattern: Int64(x))
        for _ in 0..<8 { value = (value ^ (v & 0xff)) &* 0x100_0000_01b3; v >>= 8 }
    }

    /// The hash of a string's UTF-8 bytes.
    public static func hash(_ s: String, basis: UInt64 = 0xcbf2_9ce4_8422_2325) -> UInt64 {
        var h = FNV1a(basis: basis)
        h.mix(s.utf8)
        return h.value
    }
}
