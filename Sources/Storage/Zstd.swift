import CZstd
import Foundation

/// Why a zstd frame could not be written or read.
public enum ZstdError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The bytes do not start with a zstd frame.
    case notAFrame
    /// The frame carries no content checksum, which this store requires.
    case missingChecksum
    /// The frame's content checksum does not match its content: a flipped byte.
    case checksumMismatch
    /// The frame is malformed (zstd's own error name).
    case corrupt(String)
    /// The input ended before the frame did.
    case truncated(consumed: Int)
    /// Bytes follow the end of the frame.
    case trailingData(bytes: Int)
    /// The frame's content size differs from the expected size (`actual` is nil when larger).
    case sizeMismatch(expected: Int, actual: Int?)
    /// The content is larger than the caller's limit.
    case outputTooLarge(limit: Int)
    /// The frame needs a larger decoder window than allowed.
    case windowTooLarge(windowLogMax: Int32)
    /// Another libzstd failure (allocation, parameters).
    case library(String)

    public var description: String {
        switch self {
        case .notAFrame: return "not a zstd frame (bad magic number)"
        case .missingChecksum: return "zstd frame has no content checksum"
        case .checksumMismatch: return "zstd content checksum mismatch: the data is corrupted"
        case .corrupt(let name): return "corrupted zstd frame: \(name)"
        case .truncated(let consumed): return "truncated zstd frame: input ended after \(consumed) bytes, before the frame's end"
        case .trailingData(let bytes): return "\(bytes) unexpected bytes after the end of the zstd frame"
        case .sizeMismatch(let expected, let actual):
            return "zstd frame content is \(actual.map(String.init) ?? "more than \(expected)") bytes, expected \(expected)"
        case .outputTooLarge(let limit): return "zstd frame content exceeds the \(limit)-byte limit"
        case .windowTooLarge(let log): return "zstd frame needs a window larger than 2^\(log) bytes"
        case .library(let message): return "zstd: \(message)"
        }
    }

    /// The error of a failed zstd call; `windowLogMax`, the decoder's window cap, names the limit a frame
    /// over it exceeded.
    static func from(code: Int, windowLogMax: Int32 = Zstd.defaultWindowLogMax) -> ZstdError {
        let errorCode = ZSTD_getErrorCode(code)
        let name = String(cString: ZSTD_getErrorName(code))
        switch errorCode {
        case ZSTD_error_checksum_wrong: return .checksumMismatch
        case ZSTD_error_frameParameter_windowTooLarge: return .windowTooLarge(windowLogMax: windowLogMax)
        case ZSTD_error_prefix_unknown: return .notAFrame
        case ZSTD_error_memory_allocation, ZSTD_error_parameter_unsupported, ZSTD_error_parameter_outOfBound,
             ZSTD_error_stage_wrong, ZSTD_error_init_missing:
            return .library(name)
        default: return .corrupt(name)
        }
    }
}

@inline(__always)
private func check(_ code: Int) throws -> Int {
    if ZSTD_isError(code) != 0 { throw ZstdError.from(code: code) }
    return code
}

extension Array where Element == UInt8 {
    /// Bytes written by `fill` into `capacity` uninitialized ones; `fill` returns how many it wrote, and an
    /// error it throws is rethrown (nothing is kept).
    init(capacity: Int, filling fill: (UnsafeMutableRawBufferPointer) throws -> Int) throws {
        var thrown: Error?
        self.init(unsafeUninitializedCapacity: capacity) { buffer, initialized in
            do {
                initialized = try fill(UnsafeMutableRawBufferPointer(UnsafeMutableBufferPointer(rebasing: buffer[0..<capacity])))
            } catch {
                thrown = error
                initialized = 0
            }
        }
        if let thrown { throw thrown }
    }
}

/// zstd frames: the checksum flag is always on when compressing; decoding caps the window.
public enum Zstd {
    /// Largest decoder window accepted: 2^27 = 128 MiB (zstd's own default limit).
    public static let defaultWindowLogMax: Int32 = 27
    static let magic: UInt32 = 0xFD2F_B528

    /// Upper bound of a frame's size for `count` input bytes.
    public static func compressBound(_ count: Int) -> Int { ZSTD_compressBound(count) }

    /// Checks the frame header: zstd magic and (if `requireChecksum`) the content-checksum flag.
    public static func checkFrameHeader(_ frame: UnsafeRawBufferPointer, requireChecksum: Bool = true) throws {
        guard let p = frame.baseAddress, !frame.isEmpty else { throw ZstdError.truncated(consumed: 0) }
        let magicBytes: [UInt8] = [0x28, 0xB5, 0x2F, 0xFD]
        for i in 0..<min(4, frame.count) where p.load(fromByteOffset: i, as: UInt8.self) != magicBytes[i] {
            throw ZstdError.notAFrame
        }
        guard frame.count >= 5 else { throw ZstdError.truncated(consumed: frame.count) }
        let descriptor = p.load(fromByteOffset: 4, as: UInt8.self)
        if requireChecksum && (descriptor & 0x04) == 0 { throw ZstdError.missingChecksum }
    }

    /// The content size recorded in the frame header, or nil when absent or unreadable.
    public static func frameContentSize(_ frame: UnsafeRawBufferPointer) -> Int? {
        let size = ZSTD_getFrameContentSize(frame.baseAddress, frame.count)
        guard size < UInt64.max - 1, size <= UInt64(Int.max) else { return nil }
        return Int(size)
    }

    /// Compresses `input` into one frame (content size and checksum recorded) written to `output`,
    /// which must hold `compressBound(input.count)` bytes; returns the frame's length.
    public static func compress(_ input: UnsafeRawBufferPointer, level: Int32,
                                into output: UnsafeMutableRawBufferPointer) throws -> Int {
        let compressor = try ZstdCompressor(level: level, pledgedSize: input.count)
        var written = 0
        try compressor.compress(input, final: true) { chunk in
            guard written + chunk.count <= output.count, let dst = output.baseAddress else {
                throw ZstdError.library("output buffer too small")
            }
            if let src = chunk.baseAddress { (dst + written).copyMemory(from: src, byteCount: chunk.count) }
            written += chunk.count
        }
        return written
    }

    /// Compresses `input` into a new array holding one frame.
    public static func compress(_ input: UnsafeRawBufferPointer, level: Int32 = 3) throws -> [UInt8] {
        try [UInt8](capacity: compressBound(input.count)) { try compress(input, level: level, into: $0) }
    }

    /// Decodes exactly one frame from `frame` into `output`, whose size is the expected content size.
    /// Fails on a bad header, a missing checksum (when required), a checksum mismatch, truncation,
    /// trailing bytes, a content size different from `output.count`, or a window over the cap.
    public static func decompress(_ frame: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                                  requireChecksum: Bool = true, windowLogMax: Int32 = defaultWindowLogMax) throws {
        try checkFrameHeader(frame, requireChecksum: requireChecksum)
        let declared = ZSTD_getFrameContentSize(frame.baseAddress, frame.count)
        if declared != UInt64.max && declared != UInt64.max - 1 && declared != UInt64(output.count) {
            throw ZstdError.sizeMismatch(expected: output.count, actual: declared <= UInt64(Int.max) ? Int(declared) : nil)
        }
        let context = try ZstdDecompressor.threadContext(windowLogMax: windowLogMax)
        var inBuffer = ZSTD_inBuffer(src: frame.baseAddress, size: frame.count, pos: 0)
        // Straight into `output` (no intermediate chunks); once it is full, one byte of scratch tells content
        // beyond the expected size (an error) from the end of the frame still to be read (its checksum).
        var outBuffer = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        let spare = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)
        defer { spare.deallocate() }
        var complete = false
        while !complete {
            let inBefore = inBuffer.pos, outBefore = outBuffer.pos
            var extra = ZSTD_outBuffer(dst: spare, size: 1, pos: 0)
            let hint = outBuffer.pos == outBuffer.size ? ZSTD_decompressStream(context, &extra, &inBuffer)
                : ZSTD_decompressStream(context, &outBuffer, &inBuffer)
            if ZSTD_isError(hint) != 0 { throw ZstdError.from(code: hint, windowLogMax: windowLogMax) }
            if extra.pos > 0 { throw ZstdError.sizeMismatch(expected: output.count, actual: nil) }
            complete = hint == 0
            // The input is used up and the call moved nothing: the frame ends early.
            if !complete && inBuffer.pos == inBuffer.size && inBuffer.pos == inBefore && outBuffer.pos == outBefore { break }
        }
        guard complete else { throw ZstdError.truncated(consumed: frame.count) }
        guard inBuffer.pos == frame.count else { throw ZstdError.trailingData(bytes: frame.count - inBuffer.pos) }
        guard outBuffer.pos == output.count else { throw ZstdError.sizeMismatch(expected: output.count, actual: outBuffer.pos) }
    }

    /// Decodes one frame of unknown content size, refusing more than `limit` bytes of content.
    public static func decompress(_ frame: UnsafeRawBufferPointer, limit: Int, requireChecksum: Bool = true,
                                  windowLogMax: Int32 = defaultWindowLogMax) throws -> [UInt8] {
        try checkFrameHeader(frame, requireChecksum: requireChecksum)
        let declared = ZSTD_getFrameContentSize(frame.baseAddress, frame.count)
        if declared != UInt64.max && declared != UInt64.max - 1 {
            guard declared <= UInt64(limit) else { throw ZstdError.outputTooLarge(limit: limit) }
            // The size is in the header (every frame this store writes): decoded in place as above.
            return try [UInt8](capacity: Int(declared)) { buffer in
                try decompress(frame, into: buffer, requireChecksum: requireChecksum, windowLogMax: windowLogMax)
                return buffer.count
            }
        }
        var out: [UInt8] = []
        let decompressor = try ZstdDecompressor(windowLogMax: windowLogMax)
        let done = try decompressor.decompress(frame) { chunk in
            guard out.count + chunk.count <= limit else { throw ZstdError.outputTooLarge(limit: limit) }
            out.append(contentsOf: chunk)
        }
        guard done.complete else { throw ZstdError.truncated(consumed: frame.count) }
        guard done.consumed == frame.count else { throw ZstdError.trailingData(bytes: frame.count - done.consumed) }
        return out
    }
}

/// Streaming compression (ZSTD_compressStream2) with the content checksum on.
public final class ZstdCompressor {
    private let context: OpaquePointer
    private let chunk: UnsafeMutableRawPointer
    private let chunkSize: Int

    /// `pledgedSize`, when known, is written into the frame header as its content size;
    /// `windowLog` overrides the level's window (2^windowLog bytes).
    public init(level: Int32 = 3, checksum: Bool = true, pledgedSize: Int? = nil, windowLog: Int32? = nil) throws {
        guard let context = ZSTD_createCCtx() else { throw ZstdError.library("cannot allocate a compression context") }
        self.context = context
        chunkSize = ZSTD_CStreamOutSize()
        chunk = UnsafeMutableRawPointer.allocate(byteCount: chunkSize, alignment: 16)
        do {
            _ = try check(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level))
            _ = try check(ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, checksum ? 1 : 0))
            _ = try check(ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 1))
            if let windowLog { _ = try check(ZSTD_CCtx_setParameter(context, ZSTD_c_windowLog, windowLog)) }
            if let pledgedSize { _ = try check(ZSTD_CCtx_setPledgedSrcSize(context, UInt64(pledgedSize))) }
        } catch {
            ZSTD_freeCCtx(context)
            chunk.deallocate()
            throw error
        }
    }

    deinit {
        ZSTD_freeCCtx(context)
        chunk.deallocate()
    }

    /// Feeds `input`; compressed bytes go to `sink` as they are produced. `final: true` ends the frame.
    public func compress(_ input: UnsafeRawBufferPointer, final: Bool,
                         into sink: (UnsafeRawBufferPointer) throws -> Void) throws {
        var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        let mode = final ? ZSTD_e_end : ZSTD_e_continue
        while true {
            var outBuffer = ZSTD_outBuffer(dst: chunk, size: chunkSize, pos: 0)
            let remaining = try check(ZSTD_compressStream2(context, &outBuffer, &inBuffer, mode))
            if outBuffer.pos > 0 { try sink(UnsafeRawBufferPointer(start: chunk, count: outBuffer.pos)) }
            if final ? remaining == 0 : inBuffer.pos == inBuffer.size { break }
        }
    }
}

/// Streaming decompression (ZSTD_decompressStream) of a single frame, with a window cap.
public final class ZstdDecompressor {
    private let context: OpaquePointer
    private let chunk: UnsafeMutableRawPointer
    private let chunkSize: Int
    private let windowLogMax: Int32
    private var consumedTotal = 0
    private var frameComplete = false

    public init(windowLogMax: Int32 = Zstd.defaultWindowLogMax) throws {
        guard let context = ZSTD_createDCtx() else { throw ZstdError.library("cannot allocate a decompression context") }
        self.context = context
        self.windowLogMax = windowLogMax
        chunkSize = ZSTD_DStreamOutSize()
        chunk = UnsafeMutableRawPointer.allocate(byteCount: chunkSize, alignment: 16)
        if ZSTD_isError(ZSTD_DCtx_setParameter(context, ZSTD_d_windowLogMax, windowLogMax)) != 0 {
            ZSTD_freeDCtx(context)
            chunk.deallocate()
            throw ZstdError.library("cannot set the window limit 2^\(windowLogMax)")
        }
    }

    deinit {
        ZSTD_freeDCtx(context)
        chunk.deallocate()
    }

    /// Feeds compressed bytes; content goes to `sink`. Returns whether the frame has ended and how
    /// many bytes of all input so far belong to it (input after the frame's end is not consumed).
    @discardableResult
    public func decompress(_ input: UnsafeRawBufferPointer,
                           into sink: (UnsafeRawBufferPointer) throws -> Void) throws -> (complete: Bool, consumed: Int) {
        var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        while !frameComplete {
            var outBuffer = ZSTD_outBuffer(dst: chunk, size: chunkSize, pos: 0)
            let hint = ZSTD_decompressStream(context, &outBuffer, &inBuffer)
            if ZSTD_isError(hint) != 0 { throw ZstdError.from(code: hint, windowLogMax: windowLogMax) }
            if outBuffer.pos > 0 { try sink(UnsafeRawBufferPointer(start: chunk, count: outBuffer.pos)) }
            if hint == 0 { frameComplete = true; break }
            // No more input and the output was not full: zstd needs more input.
            if inBuffer.pos == inBuffer.size && outBuffer.pos < outBuffer.size { break }
        }
        consumedTotal += inBuffer.pos
        return (frameComplete, consumedTotal)
    }

    /// Whether a whole frame has been decoded.
    public var isComplete: Bool { frameComplete }

    /// The calling thread's decompression context, reset for a new frame with the window cap set: creating
    /// a context per blob cost 7–14 % of checking a store's blobs. Freed when the thread ends.
    static func threadContext(windowLogMax: Int32) throws -> OpaquePointer {
        let context: OpaquePointer
        if let existing = pthread_getspecific(contextKey) {
            context = OpaquePointer(existing)
        } else {
            guard let created = ZSTD_createDCtx() else { throw ZstdError.library("cannot allocate a decompression context") }
            context = created
            pthread_setspecific(contextKey, UnsafeRawPointer(created))
        }
        ZSTD_DCtx_reset(context, ZSTD_reset_session_and_parameters)
        if ZSTD_isError(ZSTD_DCtx_setParameter(context, ZSTD_d_windowLogMax, windowLogMax)) != 0 {
            throw ZstdError.library("cannot set the window limit 2^\(windowLogMax)")
        }
        return context
    }

    private static let contextKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { _ = ZSTD_freeDCtx(OpaquePointer($0)) }
        return key
    }()
}
