import Foundation
import TensorCore

/// Builds a safetensors file the way the reference writer does, byte for byte: tensors ordered by
/// dtype (the reference order, descending: wide types first, which keeps every tensor aligned) then
/// by name, a compact JSON header with `__metadata__` first, padded with spaces to a multiple of 8
/// bytes.
///
/// Float32 tensors can be written as F32, F16, BF16 or F64; other dtypes go in as raw bytes.
/// Tensors are converted while writing, so a large export is not held twice in memory.
public struct SafetensorsWriter {
    enum Item {
        case tensor(Tensor, SafetensorsDType)
        case raw(SafetensorsDType, [Int], Data)

        var dtype: SafetensorsDType {
            switch self { case .tensor(_, let d): return d; case .raw(let d, _, _): return d }
        }
        var shape: [Int] {
            switch self { case .tensor(let t, _): return t.shape; case .raw(_, let s, _): return s }
        }
    }

    /// The `__metadata__` map (omitted from the header when empty).
    public var metadata: [String: String]
    private var items: [String: Item] = [:]

    public init(metadata: [String: String] = [:]) {
        self.metadata = metadata
    }

    public var isEmpty: Bool { items.isEmpty }

    /// Adds a Float32 tensor, stored as `dtype` (F32, F16, BF16 or F64). The tensor's memory is read
    /// when the file is written.
    public mutating func add(_ name: String, _ tensor: Tensor, as dtype: SafetensorsDType = .F32) throws {
        guard [.F32, .F16, .BF16, .F64].contains(dtype) else {
            throw SafetensorsError.invalidArgument(tensor: name, message: "a Float32 tensor cannot be written as \(dtype.rawValue)")
        }
        try checkName(name)
        items[name] = .tensor(tensor, dtype)
    }

    /// Adds raw little-endian bytes of any dtype; `bytes.count` must equal shape × dtype size.
    public mutating func add(_ name: String, dtype: SafetensorsDType, shape: [Int], bytes: Data) throws {
        try checkName(name)
        var n = 1
        for d in shape {
            guard d >= 0 else { throw SafetensorsError.invalidArgument(tensor: name, message: "negative dimension in \(shape)") }
            n *= d
        }
        guard n * dtype.byteSize == bytes.count else {
            throw SafetensorsError.invalidArgument(
                tensor: name, message: "shape \(shape) of \(dtype.rawValue) needs \(n * dtype.byteSize) bytes, got \(bytes.count)")
        }
        items[name] = .raw(dtype, shape, bytes)
    }

    /// Adds integers stored as I64, I32, I16, I8, U8 or BOOL (values must fit).
    public mutating func add(_ name: String, integers: [Int], shape: [Int], as dtype: SafetensorsDType = .I64) throws {
        guard shape.reduce(1, *) == integers.count else {
            throw SafetensorsError.invalidArgument(tensor: name, message: "shape \(shape) does not hold \(integers.count) values")
        }
        var data = Data(count: integers.count * dtype.byteSize)
        var fits = true
        data.withUnsafeMutableBytes { raw in
            guard let p = raw.baseAddress else { return }
            for (i, v) in integers.enumerated() {
                switch dtype {
                case .I64: p.storeBytes(of: Int64(v).littleEndian, toByteOffset: 8 * i, as: Int64.self)
                case .I32:
                    if let x = Int32(exactly: v) { p.storeBytes(of: x.littleEndian, toByteOffset: 4 * i, as: Int32.self) } else { fits = false }
                case .I16:
                    if let x = Int16(exactly: v) { p.storeBytes(of: x.littleEndian, toByteOffset: 2 * i, as: Int16.self) } else { fits = false }
                case .I8:
                    if let x = Int8(exactly: v) { p.storeBytes(of: x, toByteOffset: i, as: Int8.self) } else { fits = false }
                case .U8:
                    if let x = UInt8(exactly: v) { p.storeBytes(of: x, toByteOffset: i, as: UInt8.self) } else { fits = false }
                case .BOOL:
                    if v == 0 || v == 1 { p.storeBytes(of: UInt8(v), toByteOffset: i, as: UInt8.self) } else { fits = false }
                default: fits = false
                }
            }
        }
        guard fits else {
            throw SafetensorsError.invalidArgument(tensor: name, message: "values do not fit \(dtype.rawValue) (or it is not an integer dtype)")
        }
        try add(name, dtype: dtype, shape: shape, bytes: data)
    }

    private func checkName(_ name: String) throws {
        guard name != "__metadata__" else {
            throw SafetensorsError.invalidArgument(tensor: name, message: "the name is reserved")
        }
    }

    /// Names in data order.
    private var orderedNames: [String] {
        items.keys.sorted { a, b in
            let sa = items[a]!.dtype.rank, sb = items[b]!.dtype.rank
            return sa != sb ? sa > sb : a < b
        }
    }

    /// The 8-byte length followed by the padded JSON header.
    func headerBytes() -> Data {
        var json = "{"
        var first = true
        if !metadata.isEmpty {
            json += "\"__metadata__\":{"
            json += metadata.keys.sorted().map { "\(jsonStringLiteral($0)):\(jsonStringLiteral(metadata[$0]!))" }
                .joined(separator: ",")
            json += "}"
            first = false
        }
        var offset = 0
        for name in orderedNames {
            let item = items[name]!
            let size = item.shape.reduce(1, *) * item.dtype.byteSize
            if !first { json += "," }
            first = false
            json += "\(jsonStringLiteral(name)):{\"dtype\":\"\(item.dtype.rawValue)\",\"shape\":["
            json += item.shape.map(String.init).joined(separator: ",")
            json += "],\"data_offsets\":[\(offset),\(offset + size)]}"
            offset += size
        }
        json += "}"
        var header = Data(json.utf8)
        let padding = (8 - header.count % 8) % 8
        header.append(contentsOf: [UInt8](repeating: UInt8(ascii: " "), count: padding))
        var out = Data()
        var length = UInt64(header.count).littleEndian
        withUnsafeBytes(of: &length) { out.append(contentsOf: $0) }
        out.append(header)
        return out
    }

    /// Streams the whole file through `sink` in order, converting tensors in chunks.
    func stream(_ sink: (UnsafeRawBufferPointer) throws -> Void) throws {
        try headerBytes().withUnsafeBytes { try sink($0) }
        let chunkElements = 1 << 18
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: chunkElements * 8, alignment: 64)
        defer { scratch.deallocate() }
        for name in orderedNames {
            switch items[name]! {
            case .raw(_, _, let data):
                try data.withUnsafeBytes { try sink($0) }
            case .tensor(let t, let dtype):
                let n = t.count
                if dtype == .F32 {
                    try sink(UnsafeRawBufferPointer(start: t.data, count: 4 * n))
                    continue
                }
                var start = 0
                while start < n {
                    let m = min(chunkElements, n - start)
                    let src = t.data + start
                    switch dtype {
                    case .F16:
                        for i in 0..<m { scratch.storeBytes(of: FloatConversion.floatToHalf(src[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
                    case .BF16:
                        for i in 0..<m { scratch.storeBytes(of: FloatConversion.floatToBFloat16(src[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
                    default:
                        for i in 0..<m { scratch.storeBytes(of: Double(src[i]).bitPattern.littleEndian, toByteOffset: 8 * i, as: UInt64.self) }
                    }
                    try sink(UnsafeRawBufferPointer(start: scratch, count: m * dtype.byteSize))
                    start += m
                }
            }
        }
    }

    /// The whole file in memory.
    public func encoded() throws -> Data {
        var out = Data()
        try stream { out.append(contentsOf: $0) }
        return out
    }

    /// Writes the file atomically: a temporary file beside `url`, fsync, rename, fsync of the folder.
    public func write(to url: URL) throws {
        do {
            try AtomicFile.write(to: url.path) { fd in
                try stream { try POSIXFileSystem.writeAll(fd: fd, $0, path: url.path) }
            }
        } catch let error as FileIOError {
            throw SafetensorsError.io(file: url.path, message: error.description)
        }
    }
}
