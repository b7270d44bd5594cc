/// Bit-exact conversions between Float32 and the narrow float formats of safetensors, in software
/// so they behave the same on every platform (round to nearest, ties to even).
public enum FloatConversion {
    /// IEEE half (binary16) bits → Float.
    @inline(__always)
    public static func halfToFloat(_ h: UInt16) -> Float {
        let sign: UInt32 = UInt32(h & 0x8000) << 16
        let exponent = UInt32(h >> 10) & 0x1F
        let mantissa = UInt32(h & 0x3FF)
        if exponent == 0x1F {
            return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
        }
        if exponent == 0 {
            if mantissa == 0 { return Float(bitPattern: sign) }
            let magnitude = Float(mantissa) * 0x1p-24
            return sign != 0 ? -magnitude : magnitude
        }
        return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
    }

    /// Float → IEEE half bits (overflow gives ±infinity, NaN stays NaN).
    @inline(__always)
    public static func floatToHalf(_ f: Float) -> UInt16 {
        let x = f.bitPattern
        let sign = UInt16(truncatingIfNeeded: (x >> 16) & 0x8000)
        let exponent = Int((x >> 23) & 0xFF)
        var mantissa = x & 0x7F_FFFF
        if exponent == 0xFF {
            if mantissa == 0 { return sign | 0x7C00 }
            return sign | 0x7E00 | UInt16(truncatingIfNeeded: mantissa >> 13)
        }
        let e = exponent - 127 + 15
        if e >= 0x1F { return sign | 0x7C00 }
        if e <= 0 {
            if e < -10 { return sign }
            mantissa |= 0x80_0000
            let shift = UInt32(14 - e)
            var h = mantissa >> shift
            let remainder = mantissa & ((1 << shift) - 1)
            let halfway: UInt32 = 1 << (shift - 1)
            if remainder > halfway || (remainder == halfway && (h & 1) == 1) { h += 1 }
            return sign | UInt16(truncatingIfNeeded: h)
        }
        var h = (UInt32(e) << 10) | (mantissa >> 13)
        let remainder = mantissa & 0x1FFF
        if remainder > 0x1000 || (remainder == 0x1000 && (h & 1) == 1) { h += 1 }
        return sign | UInt16(truncatingIfNeeded: h)
    }

    /// bfloat16 bits → Float (exact).
    @inline(__always)
    public static func bfloat16ToFloat(_ b: UInt16) -> Float {
        Float(bitPattern: UInt32(b) << 16)
    }

    /// Float → bfloat16 bits.
    @inline(__always)
    public static func floatToBFloat16(_ f: Float) -> UInt16 {
        let x = f.bitPattern
        if f.isNaN { return UInt16(truncatingIfNeeded: x >> 16) | 0x40 }
        let rounded = x &+ 0x7FFF &+ ((x >> 16) & 1)
        return UInt16(truncatingIfNeeded: rounded >> 16)
    }

    /// float8 e4m3fn (bias 7, no infinities, 0x7F/0xFF NaN) → Float.
    @inline(__always)
    public static func float8E4M3ToFloat(_ b: UInt8) -> Float {
        let negative = (b & 0x80) != 0
        let exponent = Int((b >> 3) & 0xF)
        let mantissa = Float(b & 0x7)
        let magnitude: Float
        if exponent == 0xF && (b & 0x7) == 0x7 {
            return .nan
        } else if exponent == 0 {
            magnitude = mantissa * 0x1p-9
        } else {
            magnitude = (1 + mantissa / 8) * Float(sign: .plus, exponent: exponent - 7, significand: 1)
        }
        return negative ? -magnitude : magnitude
    }

    /// float8 e5m2 (bias 15, the upper byte of a half) → Float.
    @inline(__always)
    public static func float8E5M2ToFloat(_ b: UInt8) -> Float {
        halfToFloat(UInt16(b) << 8)
    }
}
