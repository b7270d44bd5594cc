import Foundation
import Storage
import TensorCore
import XCTest

final class SafetensorsTests: XCTestCase {
    /// Written by the reference implementation (Python `safetensors.numpy.save`, metadata
    /// {"format": "pt"}): a.bias F32 [3] = [1.5, -2.25, 3], b.weight F32 [2,3] = arange(6)·0.5 − 1.
    static let referenceF32 = "oAAAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJwdCJ9LCJhLmJpYXMiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzNdLCJkYXRhX29mZnNldHMiOlswLDEyXX0sImIud2VpZ2h0Ijp7ImR0eXBlIjoiRjMyIiwic2hhcGUiOlsyLDNdLCJkYXRhX29mZnNldHMiOlsxMiwzNl19fSAgICAgAADAPwAAEMAAAEBAAACAvwAAAL8AAAAAAAAAPwAAgD8AAMA/"

    /// Also by the reference implementation (metadata {"format": "np"}): f16 [1, -0.5, 65504, 6e-8],
    /// f64 [[1.25, -3.5]], i64 [-3, 0, 9007199254740993], i32 [-7, 2147483647], i16 [-300, 300],
    /// i8 [-128, 127], u8 [0, 255, 7], bool [T, F, T], scalar F32 2.5 (shape []), empty F32 [0, 4].
    static let referenceMixed = "YAIAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJucCJ9LCJpNjQiOnsiZHR5cGUiOiJJNjQiLCJzaGFwZSI6WzNdLCJkYXRhX29mZnNldHMiOlswLDI0XX0sImY2NCI6eyJkdHlwZSI6IkY2NCIsInNoYXBlIjpbMSwyXSwiZGF0YV9vZmZzZXRzIjpbMjQsNDBdfSwiZW1wdHkiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzAsNF0sImRhdGFfb2Zmc2V0cyI6WzQwLDQwXX0sInNjYWxhciI6eyJkdHlwZSI6IkYzMiIsInNoYXBlIjpbXSwiZGF0YV9vZmZzZXRzIjpbNDAsNDRdfSwiaTMyIjp7ImR0eXBlIjoiSTMyIiwic2hhcGUiOlsyXSwiZGF0YV9vZmZzZXRzIjpbNDQsNTJdfSwiZjE2Ijp7ImR0eXBlIjoiRjE2Iiwic2hhcGUiOls0XSwiZGF0YV9vZmZzZXRzIjpbNTIsNjBdfSwiaTE2Ijp7ImR0eXBlIjoiSTE2Iiwic2hhcGUiOlsyXSwiZGF0YV9vZmZzZXRzIjpbNjAsNjRdfSwiaTgiOnsiZHR5cGUiOiJJOCIsInNoYXBlIjpbMl0sImRhdGFfb2Zmc2V0cyI6WzY0LDY2XX0sInU4Ijp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzNdLCJkYXRhX29mZnNldHMiOls2Niw2OV19LCJib29sIjp7ImR0eXBlIjoiQk9PTCIsInNoYXBlIjpbM10sImRhdGFfb2Zmc2V0cyI6WzY5LDcyXX19IP3/////////AAAAAAAAAAABAAAAAAAgAAAAAAAAAPQ/AAAAAAAADMAAACBA+f///////38APAC4/3sBANT+LAGAfwD/BwEAAQ=="

    // MARK: Reference files

    func testReadsReferenceF32File() throws {
        let data = Data(base64Encoded: Self.referenceF32)!
        let file = try SafetensorsFile(data: data, name: "ref.safetensors")
        XCTAssertEqual(file.metadata, ["format": "pt"])
        XCTAssertEqual(file.tensorNames, ["a.bias", "b.weight"])
        XCTAssertEqual(try file.tensor("a.bias").array, [1.5, -2.25, 3])
        let w = try file.tensor("b.weight")
        XCTAssertEqual(w.shape, [2, 3])
        XCTAssertEqual(w.array, [-1, -0.5, 0, 0.5, 1, 1.5])
    }

    func testWriterMatchesReferenceBytes() throws {
        let data = Data(base64Encoded: Self.referenceF32)!
        var writer = SafetensorsWriter(metadata: ["format": "pt"])
        try writer.add("b.weight", Tensor(shape: [2, 3], values: [-1, -0.5, 0, 0.5, 1, 1.5]))
        try writer.add("a.bias", Tensor(shape: [3], values: [1.5, -2.25, 3]))
        XCTAssertEqual(try writer.encoded(), data)
    }

    func testReadsEveryDTypeOfReferenceFileAndRewritesItByteForByte() throws {
        let data = Data(base64Encoded: Self.referenceMixed)!
        let file = try SafetensorsFile(data: data, name: "mixed.safetensors")
        XCTAssertEqual(file.metadata, ["format": "np"])
        XCTAssertEqual(try file.tensor("f16").array, [1, -0.5, 65504, FloatConversion.halfToFloat(1)])
        XCTAssertEqual(try file.tensor("f64").array, [1.25, -3.5])
        XCTAssertEqual(try file.tensor("f64").shape, [1, 2])
        XCTAssertEqual(try file.integers("i64"), [-3, 0, 9_007_199_254_740_993])
        XCTAssertEqual(try file.integers("i32"), [-7, 2_147_483_647])
        XCTAssertEqual(try file.integers("i16"), [-300, 300])
        XCTAssertEqual(try file.integers("i8"), [-128, 127])
        XCTAssertEqual(try file.integers("u8"), [0, 255, 7])
        XCTAssertEqual(try file.integers("bool"), [1, 0, 1])
        XCTAssertEqual(try file.tensor("i32").array, [-7, 2_147_483_648])
        XCTAssertEqual(try file.tensor("bool").array, [1, 0, 1])
        let scalar = try file.tensor("scalar")
        XCTAssertEqual(scalar.shape, [])
        XCTAssertEqual(scalar.array, [2.5])
        XCTAssertEqual(try file.tensor("empty").shape, [0, 4])
        XCTAssertThrowsError(try file.integers("f16"))
        // Read → write gives the reference bytes back (order by dtype then name, header padding).
        var writer = SafetensorsWriter(metadata: file.metadata)
        for e in file.entries { try writer.add(e.name, dtype: e.dtype, shape: e.shape, bytes: try file.rawData(e.name)) }
        XCTAssertEqual(try writer.encoded(), data)
    }

    // MARK: Round trips

    func testRoundTripThroughFileBothLoadModes() throws {
        let dir = try makeTemporaryDirectory(self)
        let url = dir.appendingPathComponent("model.safetensors")
        var writer = SafetensorsWriter(metadata: ["format": "pt", "note": "quote \" slash / ü \n"])
        let a = randomTensor([7, 5], seed: 1), b = randomTensor([13], seed: 2)
        try writer.add("layer.0.weight", a)
        try writer.add("layer.0.bias", b)
        try writer.add("ids", integers: [1, -2, 3], shape: [3], as: .I64)
        try writer.add("mask", integers: [1, 0], shape: [2], as: .BOOL)
        try writer.write(to: url)
        for mode in [SafetensorsFile.LoadMode.memoryMap, .read] {
            let file = try SafetensorsFile(contentsOf: url, mode: mode)
            XCTAssertEqual(file.metadata["note"], "quote \" slash / ü \n")
            assertBitwiseEqual(try file.tensor("layer.0.weight"), a)
            assertBitwiseEqual(try file.tensor("layer.0.bias"), b)
            XCTAssertEqual(try file.integers("ids"), [1, -2, 3])
            XCTAssertEqual(try file.integers("mask"), [1, 0])
            XCTAssertEqual(try file.info("layer.0.weight").dtype, .F32)
        }
        // The header (8 + JSON) ends on an 8-byte boundary.
        let bytes = try Data(contentsOf: url)
        let n = bytes.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
        XCTAssertEqual((8 + Int(n)) % 8, 0)
    }

    func testHalfAndBFloatOutput() throws {
        let t = Tensor(shape: [5], values: [1, -2.5, 0.1, 65504, 1e-5])
        for dtype in [SafetensorsDType.F16, .BF16, .F64] {
            var writer = SafetensorsWriter()
            try writer.add("x", t, as: dtype)
            let file = try SafetensorsFile(data: try writer.encoded())
            XCTAssertEqual(try file.info("x").dtype, dtype)
            let back = try file.tensor("x")
            for i in 0..<5 {
                let tolerance: Float = dtype == .F64 ? 0 : (dtype == .F16 ? 1e-3 : 8e-3)
                XCTAssertEqual(back[i], t[i], accuracy: abs(t[i]) * tolerance + (dtype == .F16 ? 6e-8 : 0), "\(dtype) \(i)")
            }
        }
        var writer = SafetensorsWriter()
        XCTAssertThrowsError(try writer.add("x", t, as: .I32))
        XCTAssertThrowsError(try writer.add("__metadata__", t))
        XCTAssertThrowsError(try writer.add("y", dtype: .F32, shape: [3], bytes: Data(count: 8)))
        XCTAssertThrowsError(try writer.add("z", integers: [300], shape: [1], as: .I8))
    }

    func testHalfConversionMatchesFloat16Exhaustively() {
        #if !(os(macOS) && arch(x86_64))
        for bits in 0...UInt16.max {
            let mine = FloatConversion.halfToFloat(bits)
            let reference = Float(Float16(bitPattern: bits))
            if reference.isNaN { XCTAssertTrue(mine.isNaN); continue }
            XCTAssertEqual(mine.bitPattern, reference.bitPattern, "half bits \(bits)")
        }
        var s: UInt32 = 12345
        for i in 0..<200_000 {
            s = s &* 1_664_525 &+ 1_013_904_223
            let f = i < 1000 ? Float(i) * 1e-8 : Float(bitPattern: s)
            let mine = FloatConversion.floatToHalf(f)
            let reference = Float16(f).bitPattern
            if f.isNaN { XCTAssertTrue(Float16(bitPattern: mine).isNaN); continue }
            XCTAssertEqual(mine, reference, "float bits \(f.bitPattern)")
        }
        #endif
        XCTAssertEqual(FloatConversion.floatToBFloat16(1.0), 0x3F80)
        XCTAssertEqual(FloatConversion.bfloat16ToFloat(0xC020), -2.5)
        XCTAssertEqual(FloatConversion.floatToBFloat16(Float(bitPattern: 0x3F80_8000)), 0x3F80)  // tie to even
        XCTAssertEqual(FloatConversion.floatToBFloat16(Float(bitPattern: 0x3F81_8000)), 0x3F82)
        XCTAssertEqual(FloatConversion.float8E4M3ToFloat(0x38), 1.0)
        XCTAssertEqual(FloatConversion.float8E4M3ToFloat(0x7E), 448)
        XCTAssertTrue(FloatConversion.float8E4M3ToFloat(0x7F).isNaN)
        XCTAssertEqual(FloatConversion.float8E5M2ToFloat(0x3C), 1.0)
    }

    func testEveryDTypeConvertsToFloat() throws {
        var writer = SafetensorsWriter()
        func bytes<T>(_ values: [T]) -> Data { values.withUnsafeBytes { Data($0) } }
        try writer.add("f64", dtype: .F64, shape: [2], bytes: bytes([1.5, -2.0] as [Double]))
        try writer.add("f16", dtype: .F16, shape: [2], bytes: bytes([0x3C00, 0xC000] as [UInt16]))
        try writer.add("bf16", dtype: .BF16, shape: [2], bytes: bytes([0x3FC0, 0xC000] as [UInt16]))
        try writer.add("i64", dtype: .I64, shape: [2], bytes: bytes([5, -6] as [Int64]))
        try writer.add("i32", dtype: .I32, shape: [2], bytes: bytes([7, -8] as [Int32]))
        try writer.add("i16", dtype: .I16, shape: [2], bytes: bytes([9, -10] as [Int16]))
        try writer.add("u16", dtype: .U16, shape: [1], bytes: bytes([65535] as [UInt16]))
        try writer.add("u32", dtype: .U32, shape: [1], bytes: bytes([4_000_000_000] as [UInt32]))
        try writer.add("u64", dtype: .U64, shape: [1], bytes: bytes([UInt64.max] as [UInt64]))
        try writer.add("e4m3", dtype: .F8_E4M3, shape: [2], bytes: Data([0x38, 0xB8]))
        try writer.add("e5m2", dtype: .F8_E5M2, shape: [1], bytes: Data([0x3C]))
        let file = try SafetensorsFile(data: try writer.encoded())
        XCTAssertEqual(try file.tensor("f64").array, [1.5, -2])
        XCTAssertEqual(try file.tensor("f16").array, [1, -2])
        XCTAssertEqual(try file.tensor("bf16").array, [1.5, -2])
        XCTAssertEqual(try file.tensor("i64").array, [5, -6])
        XCTAssertEqual(try file.integers("i64"), [5, -6])
        XCTAssertEqual(try file.integers("i32"), [7, -8])
        XCTAssertEqual(try file.integers("i16"), [9, -10])
        XCTAssertEqual(try file.integers("u16"), [65535])
        XCTAssertEqual(try file.integers("u32"), [4_000_000_000])
        XCTAssertEqual(try file.tensor("e4m3").array, [1, -1])
        XCTAssertEqual(try file.tensor("e5m2").array, [1])
        guard case SafetensorsError.valueOutOfRange? = expectError({ try file.integers("u64") }) as? SafetensorsError else {
            return XCTFail("U64 above Int.max must be refused")
        }
        // Layout: wider dtypes first.
        XCTAssertEqual(file.entries.first?.dtype, .U64)
        XCTAssertEqual(file.entries.last?.dtype, .F8_E5M2)
    }

    func testShardedIndex() throws {
        let dir = try makeTemporaryDirectory(self)
        let a = randomTensor([4, 4], seed: 3), b = randomTensor([6], seed: 4)
        var w1 = SafetensorsWriter(), w2 = SafetensorsWriter()
        try w1.add("a", a)
        try w2.add("b", b)
        try w1.write(to: dir.appendingPathComponent("model-00001-of-00002.safetensors"))
        try w2.write(to: dir.appendingPathComponent("model-00002-of-00002.safetensors"))
        let index = #"{"metadata":{"total_size":88},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#
        try Data(index.utf8).write(to: dir.appendingPathComponent("model.safetensors.index.json"))
        let model = try SafetensorsModel.open(directory: dir)
        XCTAssertEqual(model.tensorNames, ["a", "b"])
        assertBitwiseEqual(try model.tensor("a"), a)
        assertBitwiseEqual(try model.tensor("b"), b)
        let sharded = try XCTUnwrap(model as? ShardedSafetensors)
        XCTAssertEqual(sharded.metadata["total_size"], .int(88))
        XCTAssertThrowsError(try sharded.tensor("c"))

        // Hostile or inconsistent indexes.
        for bad in [#"{"weight_map":{"a":"../model-00001-of-00002.safetensors"}}"#,
                    #"{"weight_map":{"a":"/etc/passwd"}}"#,
                    #"{"weight_map":{"b":"model-00001-of-00002.safetensors"}}"#,
                    #"{"weight_map":{"a":3}}"#,
                    #"{"metadata":{}}"#,
                    "not json"] {
            let url = dir.appendingPathComponent("bad.index.json")
            try Data(bad.utf8).write(to: url)
            let error = expectError { try ShardedSafetensors(indexURL: url) }
            XCTAssertTrue(error is SafetensorsError, "\(bad): \(String(describing: error))")
        }
    }

    // MARK: Hostile headers

    /// A file with the given header text and `dataSize` zero bytes of data.
    private func file(header: String, dataSize: Int, declaredLength: UInt64? = nil) -> Data {
        var out = Data()
        var n = (declaredLength ?? UInt64(header.utf8.count)).littleEndian
        withUnsafeBytes(of: &n) { out.append(contentsOf: $0) }
        out.append(contentsOf: Array(header.utf8))
        out.append(Data(count: dataSize))
        return out
    }

    private func refused(_ data: Data, file: StaticString = #filePath, line: UInt = #line) -> SafetensorsError? {
        do {
            let f = try SafetensorsFile(data: data, name: "hostile.safetensors")
            XCTFail("accepted a malformed file with \(f.entries.count) tensors", file: file, line: line)
            return nil
        } catch let e as SafetensorsError {
            XCTAssertTrue(e.description.contains("hostile.safetensors"), "error names the file: \(e)", file: file, line: line)
            return e
        } catch {
            XCTFail("untyped error \(error)", file: file, line: line)
            return nil
        }
    }

    /// Sharded writing: shards under the size limit, the index names them, a rewrite replaces the set
    /// and removes the earlier shards.
    func testShardedWriteRoundTripAndReplacement() throws {
        let dir = try makeTemporaryDirectory(self)
        let tensors: [(String, Tensor)] = (0..<5).map { ("t\($0)", randomTensor([64, 32 + $0], seed: UInt64($0))) }
        let index = try ShardedSafetensors.write(tensors, metadata: ["step": "7"], to: dir, stem: "ck", tag: "a", maxShardBytes: 20_000)
        var f = try ShardedSafetensors(indexURL: index, mode: .read)
        XCTAssertEqual(f.metadata["step"]?.stringValue, "7")
        XCTAssertGreaterThan(f.shards.count, 2)
        for (name, shard) in f.shards { XCTAssertLessThanOrEqual(shard.tensorNames.count * 64 * 36 * 4, 20_000 + 64 * 36 * 4, name) }
        assertStatesEqual(Dictionary(uniqueKeysWithValues: try f.tensorNames.map { ($0, try f.tensor($0)) }), Dictionary(uniqueKeysWithValues: tensors))
        let first = Set(f.shards.keys)

        let changed = tensors.map { ($0.0, randomTensor($0.1.shape, seed: 99)) }
        try ShardedSafetensors.write(changed, metadata: ["step": "8"], to: dir, stem: "ck", tag: "b", maxShardBytes: 20_000)
        f = try ShardedSafetensors(indexURL: index, mode: .read)
        XCTAssertEqual(f.metadata["step"]?.stringValue, "8")
        assertStatesEqual(Dictionary(uniqueKeysWithValues: try f.tensorNames.map { ($0, try f.tensor($0)) }), Dictionary(uniqueKeysWithValues: changed))
        let files = Set(try FileManager.default.contentsOfDirectory(atPath: dir.path))
        XCTAssertTrue(first.isDisjoint(with: files), "the earlier shards are removed")
        XCTAssertEqual(files, Set(f.shards.keys).union(["ck.safetensors.index.json"]))
    }

    func testRefusesMalformedHeaders() throws {
        let ok = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#
        XCTAssertNoThrow(try SafetensorsFile(data: file(header: ok, dataSize: 8)))

        guard case .fileTooSmall? = refused(Data([1, 2, 3, 4, 5])) else { return XCTFail("truncated file") }
        guard case .fileTooSmall? = refused(Data()) else { return XCTFail("empty file") }
        guard case .headerBeyondFile? = refused(file(header: ok, dataSize: 0, declaredLength: 1000)) else { return XCTFail("length beyond file") }
        guard case .headerTooLarge? = refused(file(header: ok, dataSize: 8, declaredLength: 200_000_000)) else { return XCTFail("header > 100 MB") }
        guard case .headerTooLarge? = refused(file(header: ok, dataSize: 8, declaredLength: UInt64.max)) else { return XCTFail("length 2^64-1") }
        guard case .offsetsOutOfBounds(_, let t, _, _, _)? = refused(file(header: #"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, dataSize: 8)), t == "a"
        else { return XCTFail("offsets past the data") }
        guard case .overlap? = refused(file(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, dataSize: 12))
        else { return XCTFail("overlap") }
        guard case .overlap? = refused(file(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, dataSize: 8))
        else { return XCTFail("aliasing tensors") }
        guard case .gap(_, let g, _, _)? = refused(file(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#, dataSize: 20)), g == "b"
        else { return XCTFail("gap") }
        guard case .gap? = refused(file(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, dataSize: 12))
        else { return XCTFail("gap at start") }
        guard case .uncoveredTail? = refused(file(header: ok, dataSize: 16)) else { return XCTFail("uncovered tail") }
        guard case .unknownDType(_, _, let d)? = refused(file(header: #"{"a":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}}"#, dataSize: 8)), d == "F17"
        else { return XCTFail("unknown dtype") }
        guard case .byteCountMismatch? = refused(file(header: #"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, dataSize: 8))
        else { return XCTFail("shape/bytes mismatch") }
        guard case .byteCountMismatch? = refused(file(header: #"{"a":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}}"#, dataSize: 8))
        else { return XCTFail("dtype size/bytes mismatch") }
        guard case .invalidHeader? = refused(file(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]"#, dataSize: 8))
        else { return XCTFail("bad JSON") }
        guard case .invalidHeader? = refused(file(header: "[1,2,3]", dataSize: 0)) else { return XCTFail("not an object") }
        guard case .invalidHeader? = refused(Data([3, 0, 0, 0, 0, 0, 0, 0, 0x7B, 0xFF, 0x7D])) else { return XCTFail("not UTF-8") }
        guard case .invalidMetadata? = refused(file(header: #"{"__metadata__":{"k":1}}"#, dataSize: 0)) else { return XCTFail("metadata value") }
        guard case .invalidMetadata? = refused(file(header: #"{"__metadata__":[1]}"#, dataSize: 0)) else { return XCTFail("metadata type") }
        let fields: [(String, String)] = [
            (#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, "shape"),
            (#"{"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,10]}}"#, "shape"),
            (#"{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}"#, "shape"),
            (#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#, "shape"),
            (#"{"a":{"dtype":"F32","shape":[2]}}"#, "data_offsets"),
            (#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, "data_offsets"),
            (#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,16]}}"#, "data_offsets"),
            (#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,1e30]}}"#, "data_offsets"),
            (#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}"#, "data_offsets"),
            (#"{"a":{"shape":[2],"data_offsets":[0,8]}}"#, "dtype"),
            (#"{"a":{"dtype":5,"shape":[2],"data_offsets":[0,8]}}"#, "dtype"),
            (#"{"a":{"dtype":"F32","data_offsets":[0,8]}}"#, "shape"),
            (#"{"a":[1]}"#, ""),
        ]
        for (header, field) in fields {
            guard case .invalidField(_, let tensor, let f, _)? = refused(file(header: header, dataSize: 8)) else {
                XCTFail("\(header) was not refused as an invalid field")
                continue
            }
            XCTAssertEqual(tensor, "a")
            XCTAssertEqual(f, field, header)
        }
    }

    func testRefusalFromDiskNamesFileAndTensor() throws {
        let dir = try makeTemporaryDirectory(self)
        let url = dir.appendingPathComponent("broken.safetensors")
        try file(header: #"{"w.weight":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, dataSize: 8).write(to: url)
        let error = expectError { try SafetensorsFile(contentsOf: url) }
        let text = "\(error!)"
        XCTAssertTrue(text.contains("broken.safetensors") && text.contains("w.weight"), text)
        let missing = expectError { try SafetensorsFile(contentsOf: dir.appendingPathComponent("absent.safetensors")) }
        guard case SafetensorsError.io? = missing as? SafetensorsError else { return XCTFail("missing file: \(String(describing: missing))") }
        let folder = expectError { try SafetensorsFile(contentsOf: dir, mode: .read) }
        XCTAssertTrue(folder is SafetensorsError)
    }

    /// Random byte edits of a valid file: every result either parses (and then reads in bounds) or
    /// is refused with a typed error.
    func testMutatedFilesNeverReadOutOfBounds() throws {
        var writer = SafetensorsWriter(metadata: ["format": "pt"])
        try writer.add("a", randomTensor([3, 4], seed: 5))
        try writer.add("bb", randomTensor([5], seed: 6), as: .F16)
        try writer.add("ccc", integers: [1, 2, 3], shape: [3], as: .I64)
        let base = try writer.encoded()
        var s: UInt64 = 99
        var accepted = 0
        for _ in 0..<3000 {
            var d = base
            s = s &* 6364136223846793005 &+ 1442695040888963407
            let edits = Int(s >> 60) % 3 + 1
            for e in 0..<edits where !d.isEmpty {
                s = s &* 6364136223846793005 &+ 1442695040888963407
                let pos = Int((s >> 20) % UInt64(d.count))
                if e == 0 && (s >> 8) & 7 == 0 { d = d.prefix(pos); continue }
                d[pos] = UInt8(truncatingIfNeeded: s >> 40)
            }
            do {
                let f = try SafetensorsFile(data: d)
                for e in f.entries {
                    _ = try f.rawData(e.name)
                    _ = try f.tensor(e.name)
                }
                accepted += 1
            } catch is SafetensorsError {
            } catch {
                XCTFail("untyped error \(error)")
            }
        }
        XCTAssertGreaterThan(accepted, 0)
    }
}
