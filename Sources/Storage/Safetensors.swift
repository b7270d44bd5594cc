import Foundation
import TensorCore

/// The element types of the safetensors format, in the reference implementation's order (its
/// writer lays tensors out by this order, descending, then by name).
public enum SafetensorsDType: String, Sendable, CaseIterable, Codable {
    case BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64

    /// Position in the reference order.
    var rank: Int { Self.allCases.firstIndex(of: self)! }

    /// Bytes per element.
    public var byteSize: Int {
        switch self {
        case .BOOL, .U8, .I8, .F8_E5M2, .F8_E4M3: return 1
        case .I16, .U16, .F16, .BF16: return 2
        case .I32, .U32, .F32: return 4
        case .I64, .U64, .F64: return 8
        }
    }

    public var isFloatingPoint: Bool {
        switch self {
        case .F8_E5M2, .F8_E4M3, .F16, .BF16, .F32, .F64: return true
        default: return false
        }
    }

    /// Integer types and BOOL: readable as `[Int]`.
    public var isInteger: Bool { !isFloatingPoint }
}

/// Why a safetensors file was refused; every case names the file and, where one is at fault, the
/// tensor and the field.
public enum SafetensorsError: Error, CustomStringConvertible, Equatable, Sendable {
    case io(file: String, message: String)
    case fileTooSmall(file: String, size: Int)
    case headerTooLarge(file: String, declared: UInt64, limit: Int)
    case headerBeyondFile(file: String, declared: UInt64, available: Int)
    case invalidHeader(file: String, message: String)
    case invalidMetadata(file: String, key: String, message: String)
    case invalidField(file: String, tensor: String, field: String, message: String)
    case unknownDType(file: String, tensor: String, dtype: String)
    case byteCountMismatch(file: String, tensor: String, expected: Int, actual: Int)
    case offsetsOutOfBounds(file: String, tensor: String, begin: Int, end: Int, dataSize: Int)
    case overlap(file: String, tensor: String, other: String)
    case gap(file: String, tensor: String, expectedOffset: Int, begin: Int)
    case uncoveredTail(file: String, coveredUpTo: Int, dataSize: Int)
    case tensorNotFound(file: String, tensor: String)
    case unsupportedConversion(file: String, tensor: String, dtype: String, target: String)
    case valueOutOfRange(file: String, tensor: String, message: String)
    case invalidIndex(file: String, message: String)
    case invalidArgument(tensor: String, message: String)

    public var description: String {
        switch self {
        case let .io(file, message):
            return "\(file): \(message)"
        case let .fileTooSmall(file, size):
            return "\(file): not a safetensors file: \(size) bytes, fewer than the 8-byte header length"
        case let .headerTooLarge(file, declared, limit):
            return "\(file): header length \(declared) exceeds the \(limit)-byte limit"
        case let .headerBeyondFile(file, declared, available):
            return "\(file): header length \(declared) runs past the end of the file (\(available) bytes after the length)"
        case let .invalidHeader(file, message):
            return "\(file): invalid header: \(message)"
        case let .invalidMetadata(file, key, message):
            return "\(file): __metadata__ \(key.isEmpty ? "" : "'\(key)' ")\(message)"
        case let .invalidField(file, tensor, field, message):
            return "\(file): tensor '\(tensor)': field '\(field)' \(message)"
        case let .unknownDType(file, tensor, dtype):
            return "\(file): tensor '\(tensor)': unknown dtype '\(dtype)'"
        case let .byteCountMismatch(file, tensor, expected, actual):
            return "\(file): tensor '\(tensor)': shape × dtype size is \(expected) bytes but data_offsets span \(actual)"
        case let .offsetsOutOfBounds(file, tensor, begin, end, dataSize):
            return "\(file): tensor '\(tensor)': data_offsets [\(begin), \(end)] outside the \(dataSize)-byte data section"
        case let .overlap(file, tensor, other):
            return "\(file): tensor '\(tensor)' overlaps tensor '\(other)'"
        case let .gap(file, tensor, expectedOffset, begin):
            return "\(file): tensor '\(tensor)' starts at \(begin), leaving a gap after offset \(expectedOffset)"
        case let .uncoveredTail(file, coveredUpTo, dataSize):
            return "\(file): tensors cover \(coveredUpTo) of the \(dataSize)-byte data section"
        case let .tensorNotFound(file, tensor):
            return "\(file): no tensor named '\(tensor)'"
        case let .unsupportedConversion(file, tensor, dtype, target):
            return "\(file): tensor '\(tensor)': cannot convert \(dtype) to \(target)"
        case let .valueOutOfRange(file, tensor, message):
            return "\(file): tensor '\(tensor)': \(message)"
        case let .invalidIndex(file, message):
            return "\(file): invalid index: \(message)"
        case let .invalidArgument(tensor, message):
            return "tensor '\(tensor)': \(message)"
        }
    }
}

/// One tensor's header entry; offsets are relative to the start of the data section.
public struct SafetensorsTensorInfo: Sendable, Equatable {
    public let name: String
    public let dtype: SafetensorsDType
    public let shape: [Int]
    public let dataOffsets: Range<Int>

    public var elementCount: Int { shape.reduce(1, *) }
    public var byteCount: Int { dataOffsets.count }
}

/// Anything that hands out named Float32 tensors: a safetensors file, a sharded checkpoint, a
/// checkpoint-store version.
public protocol TensorSource {
    /// Tensor names, sorted.
    var tensorNames: [String] { get }
    /// The named tensor as Float32.
    func tensor(_ name: String) throws -> Tensor
}

/// A validated safetensors file (memory-mapped or read once). Every header entry is checked when it
/// opens (dtype known, shape × dtype size = byte count, offsets in bounds, tensors contiguous without
/// overlap or gap and covering the data section, header ≤ 100 MB), so later reads cannot go out of
/// bounds. A memory-mapped file must not be truncated by someone else while it is open; use `.read`
/// when that can happen.
public final class SafetensorsFile: TensorSource, @unchecked Sendable {
    /// Largest accepted header (the reference implementation's limit).
    public static let maxHeaderBytes = 100_000_000

    public enum LoadMode: Sendable { case memoryMap, read }

    /// The path (or name) used in errors.
    public let path: String
    /// The `__metadata__` string map (empty when absent).
    public let metadata: [String: String]
    /// Entries in data order.
    public let entries: [SafetensorsTensorInfo]
    private let byName: [String: Int]
    private let bytes: FileBytes
    private let dataStart: Int

    /// Opens and validates a file.
    public convenience init(contentsOf url: URL, mode: LoadMode = .memoryMap) throws {
        let path = url.path
        let bytes: FileBytes
        do {
            bytes = mode == .memoryMap ? try FileBytes.map(path) : try FileBytes.read(path)
        } catch let error as FileIOError {
            throw SafetensorsError.io(file: path, message: error.description)
        }
        try self.init(bytes: bytes, path: path)
    }

    /// Parses and validates an in-memory file; `name` is used in errors.
    public convenience init(data: Data, name: String = "<memory>") throws {
        try self.init(bytes: FileBytes(copying: data), path: name)
    }

    /// Parses and validates file bytes already in memory.
    public init(bytes: FileBytes, path: String) throws {
        self.path = path
        self.bytes = bytes
        let total = bytes.count
        guard total >= 8, let base = bytes.baseAddress else {
            throw SafetensorsError.fileTooSmall(file: path, size: total)
        }
        let declared = UInt64(littleEndian: base.loadUnaligned(as: UInt64.self))
        guard declared <= UInt64(Self.maxHeaderBytes) else {
            throw SafetensorsError.headerTooLarge(file: path, declared: declared, limit: Self.maxHeaderBytes)
        }
        guard declared <= UInt64(total - 8) else {
            throw SafetensorsError.headerBeyondFile(file: path, declared: declared, available: total - 8)
        }
        let headerLength = Int(declared)
        dataStart = 8 + headerLength
        let dataSize = total - dataStart
        let headerData = Data(bytes: base + 8, count: headerLength)
        guard headerData.first == UInt8(ascii: "{") else {
            throw SafetensorsError.invalidHeader(file: path, message: "the header must be a JSON object starting with '{'")
        }
        let root: JSONValue
        do {
            root = try JSONValue(parsing: headerData)
        } catch {
            throw SafetensorsError.invalidHeader(file: path, message: "not valid JSON (\(Self.shortDescription(error)))")
        }
        guard case .object(let object) = root else {
            throw SafetensorsError.invalidHeader(file: path, message: "the header is not a JSON object")
        }
        var metadata: [String: String] = [:]
        var entries: [SafetensorsTensorInfo] = []
        entries.reserveCapacity(object.count)
        for key in object.keys.sorted() {
            let value = object[key]!
            if key == "__metadata__" {
                guard case .object(let map) = value else {
                    throw SafetensorsError.invalidMetadata(file: path, key: "", message: "is not a JSON object")
                }
                for (k, v) in map {
                    guard case .string(let s) = v else {
                        throw SafetensorsError.invalidMetadata(file: path, key: k, message: "is not a string")
                    }
                    metadata[k] = s
                }
                continue
            }
            entries.append(try Self.parseEntry(name: key, value: value, dataSize: dataSize, file: path))
        }
        // Data order; ties (empty tensors) by end then name, so the walk below is deterministic.
        entries.sort {
            ($0.dataOffsets.lowerBound, $0.dataOffsets.upperBound, $0.name)
                < ($1.dataOffsets.lowerBound, $1.dataOffsets.upperBound, $1.name)
        }
        var expected = 0
        var previous: String?
        for entry in entries {
            if entry.dataOffsets.lowerBound < expected {
                throw SafetensorsError.overlap(file: path, tensor: entry.name, other: previous ?? "")
            }
            if entry.dataOffsets.lowerBound > expected {
                throw SafetensorsError.gap(file: path, tensor: entry.name, expectedOffset: expected,
                                           begin: entry.dataOffsets.lowerBound)
            }
            expected = entry.dataOffsets.upperBound
            previous = entry.name
        }
        guard expected == dataSize else {
            throw SafetensorsError.uncoveredTail(file: path, coveredUpTo: expected, dataSize: dataSize)
        }
        self.metadata = metadata
        self.entries = entries
        var byName: [String: Int] = [:]
        for (i, e) in entries.enumerated() { byName[e.name] = i }
        self.byName = byName
    }

    private static func shortDescription(_ error: Error) -> String {
        if let e = error as? DecodingError {
            switch e {
            case .dataCorrupted(let c): return c.underlyingError.map { "\($0)" } ?? c.debugDescription
            default: return "\(e)"
            }
        }
        return "\(error)"
    }

    private static func nonNegativeInt(_ v: JSONValue) -> Int? {
        if case .int(let i) = v, i >= 0, i <= Int64(Int.max) { return Int(i) }
        return nil
    }

    private static func parseEntry(name: String, value: JSONValue, dataSize: Int, file: String) throws
        -> SafetensorsTensorInfo {
        guard case .object(let fields) = value else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "", message: "is not a JSON object")
        }
        guard let dtypeValue = fields["dtype"] else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "dtype", message: "is missing")
        }
        guard case .string(let dtypeName) = dtypeValue else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "dtype", message: "is not a string")
        }
        guard let dtype = SafetensorsDType(rawValue: dtypeName) else {
            throw SafetensorsError.unknownDType(file: file, tensor: name, dtype: dtypeName)
        }
        guard let shapeValue = fields["shape"] else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "shape", message: "is missing")
        }
        guard case .array(let dims) = shapeValue else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "shape", message: "is not an array")
        }
        var shape: [Int] = []
        var elements = 1
        for d in dims {
            guard let n = nonNegativeInt(d) else {
                throw SafetensorsError.invalidField(file: file, tensor: name, field: "shape",
                                                    message: "holds \(d), not a non-negative integer")
            }
            let (product, overflow) = elements.multipliedReportingOverflow(by: n)
            guard !overflow else {
                throw SafetensorsError.invalidField(file: file, tensor: name, field: "shape", message: "element count overflows")
            }
            elements = product
            shape.append(n)
        }
        let (byteCount, overflow) = elements.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "shape", message: "byte count overflows")
        }
        guard let offsetsValue = fields["data_offsets"] else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "data_offsets", message: "is missing")
        }
        guard case .array(let offsets) = offsetsValue, offsets.count == 2,
              let begin = nonNegativeInt(offsets[0]), let end = nonNegativeInt(offsets[1]) else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "data_offsets",
                                                message: "is not a pair of non-negative integers")
        }
        guard begin <= end else {
            throw SafetensorsError.invalidField(file: file, tensor: name, field: "data_offsets",
                                                message: "begins at \(begin) after its end \(end)")
        }
        guard end - begin == byteCount else {
            throw SafetensorsError.byteCountMismatch(file: file, tensor: name, expected: byteCount, actual: end - begin)
        }
        guard end <= dataSize else {
            throw SafetensorsError.offsetsOutOfBounds(file: file, tensor: name, begin: begin, end: end, dataSize: dataSize)
        }
        return SafetensorsTensorInfo(name: name, dtype: dtype, shape: shape, dataOffsets: begin..<end)
    }

    // MARK: Access

    /// Tensor names, sorted.
    public var tensorNames: [String] { byName.keys.sorted() }

    public func contains(_ name: String) -> Bool { byName[name] != nil }

    /// The header entry of `name`.
    public func info(_ name: String) throws -> SafetensorsTensorInfo {
        guard let i = byName[name] else { throw SafetensorsError.tensorNotFound(file: path, tensor: name) }
        return entries[i]
    }

    /// Calls `body` with the raw (little-endian) bytes of `name`, valid only inside `body`.
    public func withRawBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let entry = try info(name)
        let start = bytes.baseAddress.map { $0 + dataStart + entry.dataOffsets.lowerBound }
        return try body(UnsafeRawBufferPointer(start: entry.byteCount == 0 ? nil : start, count: entry.byteCount))
    }

    /// A copy of the raw bytes of `name`.
    public func rawData(_ name: String) throws -> Data {
        try withRawBytes(name) { Data($0) }
    }

    /// `name` converted to a Float32 tensor (any floating-point or integer dtype).
    public func tensor(_ name: String) throws -> Tensor {
        let entry = try info(name)
        let t = Tensor(shape: entry.shape)
        try withRawBytes(name) { raw in
            Self.convertToFloat(raw, dtype: entry.dtype, count: entry.elementCount, into: t.data)
        }
        return t
    }

    /// `name` as integers (integer and BOOL dtypes).
    public func integers(_ name: String) throws -> [Int] {
        let entry = try info(name)
        guard entry.dtype.isInteger else {
            throw SafetensorsError.unsupportedConversion(file: path, tensor: name, dtype: entry.dtype.rawValue, target: "[Int]")
        }
        let n = entry.elementCount
        return try withRawBytes(name) { raw -> [Int] in
            var tooLarge = false
            let result = [Int](unsafeUninitializedCapacity: n) { out, initialized in
                guard let src = raw.baseAddress else { initialized = 0; return }
                switch entry.dtype {
                case .BOOL: for i in 0..<n { out[i] = src.load(fromByteOffset: i, as: UInt8.self) != 0 ? 1 : 0 }
                case .U8: for i in 0..<n { out[i] = Int(src.load(fromByteOffset: i, as: UInt8.self)) }
                case .I8: for i in 0..<n { out[i] = Int(src.load(fromByteOffset: i, as: Int8.self)) }
                case .I16: for i in 0..<n { out[i] = Int(Int16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))) }
                case .U16: for i in 0..<n { out[i] = Int(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) }
                case .I32: for i in 0..<n { out[i] = Int(Int32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))) }
                case .U32: for i in 0..<n { out[i] = Int(UInt32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
                case .I64: for i in 0..<n { out[i] = Int(Int64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))) }
                case .U64:
                    for i in 0..<n {
                        let v = UInt64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
                        if v > UInt64(Int.max) { tooLarge = true; out[i] = 0 } else { out[i] = Int(v) }
                    }
                default: break
                }
                initialized = n
            }
            if tooLarge {
                throw SafetensorsError.valueOutOfRange(file: path, tensor: name, message: "a U64 value exceeds Int.max")
            }
            return result
        }
    }

    /// Every tensor converted to Float32, by name.
    public func allTensors() throws -> [String: Tensor] {
        var out: [String: Tensor] = [:]
        for e in entries { out[e.name] = try tensor(e.name) }
        return out
    }

    /// Converts `count` little-endian elements of `dtype` at `raw` to Float32 at `out`.
    static func convertToFloat(_ raw: UnsafeRawBufferPointer, dtype: SafetensorsDType, count n: Int,
                               into out: UnsafeMutablePointer<Float>) {
        guard n > 0, let src = raw.baseAddress else { return }
        switch dtype {
        case .F32: UnsafeMutableRawPointer(out).copyMemory(from: src, byteCount: 4 * n)
        case .F64: for i in 0..<n { out[i] = Float(Double(bitPattern: UInt64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)))) }
        case .F16: for i in 0..<n { out[i] = FloatConversion.halfToFloat(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) }
        case .BF16: for i in 0..<n { out[i] = FloatConversion.bfloat16ToFloat(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) }
        case .F8_E4M3: for i in 0..<n { out[i] = FloatConversion.float8E4M3ToFloat(src.load(fromByteOffset: i, as: UInt8.self)) }
        case .F8_E5M2: for i in 0..<n { out[i] = FloatConversion.float8E5M2ToFloat(src.load(fromByteOffset: i, as: UInt8.self)) }
        case .BOOL: for i in 0..<n { out[i] = src.load(fromByteOffset: i, as: UInt8.self) != 0 ? 1 : 0 }
        case .U8: for i in 0..<n { out[i] = Float(src.load(fromByteOffset: i, as: UInt8.self)) }
        case .I8: for i in 0..<n { out[i] = Float(src.load(fromByteOffset: i, as: Int8.self)) }
        case .I16: for i in 0..<n { out[i] = Float(Int16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self))) }
        case .U16: for i in 0..<n { out[i] = Float(UInt16(littleEndian: src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) }
        case .I32: for i in 0..<n { out[i] = Float(Int32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self))) }
        case .U32: for i in 0..<n { out[i] = Float(UInt32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
        case .I64: for i in 0..<n { out[i] = Float(Int64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))) }
        case .U64: for i in 0..<n { out[i] = Float(UInt64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))) }
        }
    }
}
