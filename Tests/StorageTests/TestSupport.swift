import Foundation
import Storage
import TensorCore
import XCTest

/// A fresh temporary folder, removed when the test ends.
func makeTemporaryDirectory(_ test: XCTestCase, file: StaticString = #filePath, line: UInt = #line) throws -> URL {
    let url = FileManager.default.temporaryDirectory
        .appendingPathComponent("dafnet-storage-tests-" + UUID().uuidString, isDirectory: true)
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(at: url) }
    return url
}

/// A tensor with deterministic pseudo-random values.
func randomTensor(_ shape: [Int], seed: UInt64) -> Tensor {
    let t = Tensor(shape: shape)
    var s = seed &* 0x9E37_79B9_7F4A_7C15 &+ 1
    for i in 0..<t.count {
        s = s &* 6364136223846793005 &+ 1442695040888963407
        t.data[i] = Float(Int64(bitPattern: s >> 11) % 2_000_001 - 1_000_000) / 1_000_000
    }
    return t
}

func assertBitwiseEqual(_ a: Tensor, _ b: Tensor, _ message: String = "", file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(a.shape, b.shape, message, file: file, line: line)
    guard a.shape == b.shape else { return }
    XCTAssertEqual(memcmp(a.data, b.data, a.count * 4), 0, "values differ \(message)", file: file, line: line)
}

func assertStatesEqual(_ a: [String: Tensor], _ b: [String: Tensor], _ message: String = "",
                       file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(Set(a.keys), Set(b.keys), message, file: file, line: line)
    for (name, t) in a { if let u = b[name] { assertBitwiseEqual(t, u, "\(name) \(message)", file: file, line: line) } }
}

/// Runs `body` and returns its error, failing the test when it does not throw.
func expectError<T>(_ body: () throws -> T, file: StaticString = #filePath, line: UInt = #line) -> Error? {
    do {
        _ = try body()
        XCTFail("expected an error", file: file, line: line)
        return nil
    } catch {
        return error
    }
}

/// Flips one byte of a file in place.
func flipByte(in url: URL, at offset: Int) throws {
    var data = try Data(contentsOf: url)
    data[offset] ^= 0x5A
    try data.write(to: url)
}

/// The real file system with fsync turned into a no-op: the tests exercise every write, rename and
/// removal for real but skip the ~3 ms disk flushes that only matter on power loss.
struct NoSyncFileSystem: StoreFileSystem {
    let real = POSIXFileSystem()
    func writeNewFile(atPath path: String, contents: UnsafeRawBufferPointer) throws { try real.writeNewFile(atPath: path, contents: contents) }
    func append(toFileAtPath path: String, contents: UnsafeRawBufferPointer) throws { try real.append(toFileAtPath: path, contents: contents) }
    func syncFile(atPath path: String) throws { guard FileManager.default.fileExists(atPath: path) else { throw FileIOError("fsync", path, code: ENOENT) } }
    func rename(atPath from: String, toPath to: String) throws { try real.rename(atPath: from, toPath: to) }
    func syncDirectory(atPath path: String) throws {}
    func removeFile(atPath path: String) throws { try real.removeFile(atPath: path) }
}
