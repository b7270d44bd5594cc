import Foundation

/// Byte shuffle (as in blosc): the k-th byte of every element is grouped into byte plane k, so the
/// slowly varying sign/exponent bytes of floats sit together and compress better. Trailing bytes
/// that do not fill an element are copied unchanged.
public enum ByteShuffle {
    public static func shuffle(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, elementSize: Int) {
        precondition(dst.count >= src.count && elementSize >= 1)
        guard let s = src.baseAddress, let d = dst.baseAddress else { return }
        let n = src.count / elementSize
        if elementSize == 4 {
            let d0 = d.assumingMemoryBound(to: UInt8.self)
            let d1 = d0 + n, d2 = d0 + 2 * n, d3 = d0 + 3 * n
            for i in 0..<n {
                let v = s.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)
                d0[i] = UInt8(truncatingIfNeeded: v)
                d1[i] = UInt8(truncatingIfNeeded: v >> 8)
                d2[i] = UInt8(truncatingIfNeeded: v >> 16)
                d3[i] = UInt8(truncatingIfNeeded: v >> 24)
            }
        } else {
            let sb = s.assumingMemoryBound(to: UInt8.self), db = d.assumingMemoryBound(to: UInt8.self)
            for plane in 0..<elementSize {
                let out = db + plane * n
                for i in 0..<n { out[i] = sb[i * elementSize + plane] }
            }
        }
        let tail = src.count - n * elementSize
        if tail > 0 { (d + n * elementSize).copyMemory(from: s + n * elementSize, byteCount: tail) }
    }

    public static func unshuffle(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer, elementSize: Int) {
        precondition(dst.count >= src.count && elementSize >= 1)
        guard let s = src.baseAddress, let d = dst.baseAddress else { return }
        let n = src.count / elementSize
        if elementSize == 4 {
            let s0 = s.assumingMemoryBound(to: UInt8.self)
            let s1 = s0 + n, s2 = s0 + 2 * n, s3 = s0 + 3 * n
            let out = d.assumingMemoryBound(to: UInt8.self)
            for i in 0..<n {
                let v = UInt32(s0[i]) | (UInt32(s1[i]) << 8) | (UInt32(s2[i]) << 16) | (UInt32(s3[i]) << 24)
                UnsafeMutableRawPointer(out + 4 * i).storeBytes(of: v, as: UInt32.self)
            }
        } else {
            let sb = s.assumingMemoryBound(to: UInt8.self), db = d.assumingMemoryBound(to: UInt8.self)
            for plane in 0..<elementSize {
                let input = sb + plane * n
                for i in 0..<n { db[i * elementSize + plane] = input[i] }
            }
        }
        let tail = src.count - n * elementSize
        if tail > 0 { (d + n * elementSize).copyMemory(from: s + n * elementSize, byteCount: tail) }
    }
}

/// Why a stored blob could not be decoded.
public enum BlobError: Error, CustomStringConvertible, Equatable, Sendable {
    case badHeader(String)
    case frame(ZstdError)

    public var description: String {
        switch self {
        case .badHeader(let m): return "bad blob header: \(m)"
        case .frame(let e): return "\(e)"
        }
    }
}

/// The stored form of a blob: an 8-byte header, then one zstd frame (checksum on).
///
/// Header: `DFNB`, format 1, flags (bit 0: byte-shuffled), element size of the shuffle (1 when
/// not shuffled), a zero byte. The shuffle is recorded in the blob itself, so any reader (verify,
/// an archive restore) decodes it without the manifest.
public enum BlobCodec {
    public static let headerSize = 8
    static let magic: [UInt8] = Array("DFNB".utf8)
    static let formatVersion: UInt8 = 1

    /// What the header says.
    public struct Header: Equatable, Sendable {
        public let shuffled: Bool
        public let elementSize: Int
    }

    /// Compresses `raw` at `level`; `shuffleElementSize` (4 for Float32) byte-shuffles first.
    public static func encode(_ raw: UnsafeRawBufferPointer, level: Int32, shuffleElementSize: Int? = nil) throws -> [UInt8] {
        let shuffle = shuffleElementSize.map { $0 > 1 } ?? false
        let elementSize = shuffle ? shuffleElementSize! : 1
        guard elementSize <= 255 else { throw BlobError.badHeader("shuffle element size \(elementSize) above 255") }
        let bound = headerSize + Zstd.compressBound(raw.count)
        return try [UInt8](capacity: bound) { base in
            for i in 0..<4 { base[i] = magic[i] }
            base[4] = formatVersion
            base[5] = shuffle ? 1 : 0
            base[6] = UInt8(elementSize)
            base[7] = 0
            let frameArea = UnsafeMutableRawBufferPointer(rebasing: base[headerSize...])
            guard shuffle && raw.count > 0 else { return headerSize + (try Zstd.compress(raw, level: level, into: frameArea)) }
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: raw.count, alignment: 64)
            defer { scratch.deallocate() }
            ByteShuffle.shuffle(raw, into: scratch, elementSize: elementSize)
            return headerSize + (try Zstd.compress(UnsafeRawBufferPointer(scratch), level: level, into: frameArea))
        }
    }

    /// Reads and checks the header.
    public static func header(_ blob: UnsafeRawBufferPointer) throws -> Header {
        guard blob.count >= headerSize else { throw BlobError.badHeader("\(blob.count) bytes, shorter than the header") }
        for i in 0..<4 where blob[i] != magic[i] { throw BlobError.badHeader("bad magic") }
        guard blob[4] == formatVersion else { throw BlobError.badHeader("unknown format \(blob[4])") }
        guard blob[5] & ~1 == 0, blob[7] == 0 else { throw BlobError.badHeader("unknown flags") }
        let shuffled = blob[5] & 1 == 1
        let elementSize = Int(blob[6])
        guard shuffled ? elementSize >= 2 : elementSize == 1 else { throw BlobError.badHeader("bad element size \(elementSize)") }
        return Header(shuffled: shuffled, elementSize: elementSize)
    }

    /// The content size the blob's frame declares (nil when the frame does not record it).
    public static func declaredContentSize(_ blob: UnsafeRawBufferPointer) throws -> Int? {
        _ = try header(blob)
        let frame = UnsafeRawBufferPointer(rebasing: blob[headerSize...])
        do {
            try Zstd.checkFrameHeader(frame, requireChecksum: true)
        } catch let e as ZstdError {
            throw BlobError.frame(e)
        }
        return Zstd.frameContentSize(frame)
    }

    /// Decodes into `output`, whose size must be the content size.
    public static func decode(_ blob: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws {
        let h = try header(blob)
        let frame = UnsafeRawBufferPointer(rebasing: blob[headerSize...])
        do {
            if h.shuffled && output.count > 0 {
                let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: output.count, alignment: 64)
                defer { scratch.deallocate() }
                try Zstd.decompress(frame, into: scratch)
                ByteShuffle.unshuffle(UnsafeRawBufferPointer(scratch), into: output, elementSize: h.elementSize)
            } else {
                try Zstd.decompress(frame, into: output)
            }
        } catch let e as ZstdError {
            throw BlobError.frame(e)
        }
    }

    /// Decodes a blob of unknown content size, refusing more than `limit` bytes.
    public static func decode(_ blob: UnsafeRawBufferPointer, limit: Int) throws -> [UInt8] {
        let h = try header(blob)
        let frame = UnsafeRawBufferPointer(rebasing: blob[headerSize...])
        let content: [UInt8]
        do {
            content = try Zstd.decompress(frame, limit: limit)
        } catch let e as ZstdError {
            throw BlobError.frame(e)
        }
        guard h.shuffled else { return content }
        return [UInt8](unsafeUninitializedCapacity: content.count) { buffer, initialized in
            content.withUnsafeBytes { ByteShuffle.unshuffle($0, into: UnsafeMutableRawBufferPointer(buffer), elementSize: h.elementSize) }
            initialized = content.count
        }
    }
}
