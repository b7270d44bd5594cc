import Foundation
import Storage
import XCTest

final class ZstdTests: XCTestCase {
    private func sample(_ count: Int) -> [UInt8] {
        var s: UInt32 = 7
        return (0..<count).map { i in
            s = s &* 1_103_515_245 &+ 12345
            return i % 7 == 0 ? UInt8(truncatingIfNeeded: s >> 16) : UInt8(i % 31)
        }
    }

    func testRoundTripSizes() throws {
        for count in [0, 1, 100, 131_072 + 17, 1_000_000] {
            let input = sample(count)
            let frame = try input.withUnsafeBytes { try Zstd.compress($0, level: 3) }
            try frame.withUnsafeBytes { try Zstd.checkFrameHeader($0, requireChecksum: true) }
            var output = [UInt8](repeating: 0, count: count)
            try frame.withUnsafeBytes { f in try output.withUnsafeMutableBytes { try Zstd.decompress(f, into: $0) } }
            XCTAssertEqual(output, input, "size \(count)")
            let unknown = try frame.withUnsafeBytes { try Zstd.decompress($0, limit: count) }
            XCTAssertEqual(unknown, input)
            if count > 0 {
                let error = expectError { try frame.withUnsafeBytes { try Zstd.decompress($0, limit: count - 1) } }
                XCTAssertEqual(error as? ZstdError, .outputTooLarge(limit: count - 1))
            }
        }
    }

    func testStreamingInChunks() throws {
        let input = sample(700_000)
        let compressor = try ZstdCompressor(level: 1)
        var frame: [UInt8] = []
        try input.withUnsafeBytes { all in
            var start = 0
            while start < all.count {
                let end = min(all.count, start + 50_000)
                try compressor.compress(UnsafeRawBufferPointer(rebasing: all[start..<end]), final: end == all.count) {
                    frame.append(contentsOf: $0)
                }
                start = end
            }
        }
        let decompressor = try ZstdDecompressor()
        var output: [UInt8] = []
        try frame.withUnsafeBytes { all in
            var start = 0
            while start < all.count {
                let end = min(all.count, start + 777)
                let r = try decompressor.decompress(UnsafeRawBufferPointer(rebasing: all[start..<end])) { output.append(contentsOf: $0) }
                XCTAssertEqual(r.complete, end == all.count)
                start = end
            }
        }
        XCTAssertTrue(decompressor.isComplete)
        XCTAssertEqual(output, input)
    }

    /// Flipping any byte of a frame never yields wrong data silently: decoding fails (content
    /// checksum, header and size checks), or, for the rare bit that the entropy coder ignores, the
    /// content comes out intact. (The store's sha256 over the stored bytes catches those too.)
    func testEveryFlippedByteIsDetected() throws {
        let input = sample(3000)
        let frame = try input.withUnsafeBytes { try Zstd.compress($0, level: 3) }
        var detected = 0, trials = 0
        for position in 0..<frame.count {
            for mask: UInt8 in [0x01, 0x80, 0xFF] {
                var corrupted = frame
                corrupted[position] ^= mask
                var output = [UInt8](repeating: 0, count: input.count)
                trials += 1
                do {
                    try corrupted.withUnsafeBytes { f in try output.withUnsafeMutableBytes { try Zstd.decompress(f, into: $0) } }
                    XCTAssertEqual(output, input, "byte \(position) mask \(mask) decoded to wrong data without an error")
                } catch is ZstdError {
                    detected += 1
                }
            }
        }
        XCTAssertGreaterThan(Double(detected) / Double(trials), 0.98)
        // A flip in the data itself is reported as a checksum mismatch.
        var raw = [UInt8](repeating: 0, count: 4096)
        for i in raw.indices { raw[i] = UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 13) }
        let stored = try raw.withUnsafeBytes { try Zstd.compress($0, level: 1) }
        var flipped = stored
        flipped[stored.count / 2] ^= 0x10
        var out = [UInt8](repeating: 0, count: raw.count)
        let e = expectError { try flipped.withUnsafeBytes { f in try out.withUnsafeMutableBytes { try Zstd.decompress(f, into: $0) } } }
        XCTAssertNotNil(e as? ZstdError)
        XCTAssertTrue("\(e!)".contains("corrupt") || "\(e!)".contains("checksum"), "\(e!)")
    }

    func testTruncatedFrameAtEveryLength() throws {
        let input = sample(5000)
        let frame = try input.withUnsafeBytes { try Zstd.compress($0, level: 3) }
        for length in 0..<frame.count {
            var output = [UInt8](repeating: 0, count: input.count)
            let error = expectError {
                try frame.withUnsafeBytes { f in
                    try output.withUnsafeMutableBytes { try Zstd.decompress(UnsafeRawBufferPointer(rebasing: f[0..<length]), into: $0) }
                }
            }
            XCTAssertTrue(error is ZstdError, "length \(length)")
        }
        // The last bytes missing: a clear "truncated" message.
        var output = [UInt8](repeating: 0, count: input.count)
        let error = expectError {
            try frame.withUnsafeBytes { f in
                try output.withUnsafeMutableBytes { try Zstd.decompress(UnsafeRawBufferPointer(rebasing: f[0..<(f.count - 2)]), into: $0) }
            }
        }
        guard case ZstdError.truncated? = error as? ZstdError else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue("\(error!)".contains("truncated"))
    }

    func testTrailingDataWrongSizeAndMissingChecksum() throws {
        let input = sample(1000)
        let frame = try input.withUnsafeBytes { try Zstd.compress($0, level: 3) }
        var output = [UInt8](repeating: 0, count: input.count)
        let trailing = expectError {
            try (frame + [1, 2, 3]).withUnsafeBytes { f in try output.withUnsafeMutableBytes { try Zstd.decompress(f, into: $0) } }
        }
        XCTAssertEqual(trailing as? ZstdError, .trailingData(bytes: 3))
        var short = [UInt8](repeating: 0, count: 999)
        let size = expectError { try frame.withUnsafeBytes { f in try short.withUnsafeMutableBytes { try Zstd.decompress(f, into: $0) } } }
        XCTAssertEqual(size as? ZstdError, .sizeMismatch(expected: 999, actual: 1000))
        let notFrame = expectError { try [UInt8](repeating: 7, count: 20).withUnsafeBytes { try Zstd.decompress($0, limit: 100) } }
        XCTAssertEqual(notFrame as? ZstdError, .notAFrame)

        let compressor = try ZstdCompressor(level: 3, checksum: false, pledgedSize: input.count)
        var plain: [UInt8] = []
        try input.withUnsafeBytes { try compressor.compress($0, final: true) { plain.append(contentsOf: $0) } }
        let missing = expectError { try plain.withUnsafeBytes { f in try output.withUnsafeMutableBytes { try Zstd.decompress(f, into: $0) } } }
        XCTAssertEqual(missing as? ZstdError, .missingChecksum)
        try plain.withUnsafeBytes { f in try output.withUnsafeMutableBytes { try Zstd.decompress(f, into: $0, requireChecksum: false) } }
        XCTAssertEqual(output, input)
    }

    func testWindowCap() throws {
        // No pledged size and a 2^28 window: the header asks for more than the 2^27 cap.
        let input = sample(200_000)
        let compressor = try ZstdCompressor(level: 1, windowLog: 28)
        var frame: [UInt8] = []
        try input.withUnsafeBytes { all in
            try compressor.compress(UnsafeRawBufferPointer(rebasing: all[0..<1000]), final: false) { frame.append(contentsOf: $0) }
            try compressor.compress(UnsafeRawBufferPointer(rebasing: all[1000...]), final: true) { frame.append(contentsOf: $0) }
        }
        let error = expectError { try frame.withUnsafeBytes { try Zstd.decompress($0, limit: 1 << 20) } }
        XCTAssertEqual(error as? ZstdError, .windowTooLarge(windowLogMax: 27))
        let ok = try frame.withUnsafeBytes { try Zstd.decompress($0, limit: 1 << 20, windowLogMax: 28) }
        XCTAssertEqual(ok, input)
    }

    func testByteShuffleRoundTripWithTail() {
        for count in [0, 3, 4, 17, 1026] {
            let input = sample(count)
            var shuffled = [UInt8](repeating: 0, count: count)
            var back = [UInt8](repeating: 0, count: count)
            for size in [2, 4, 8] {
                input.withUnsafeBytes { s in shuffled.withUnsafeMutableBytes { ByteShuffle.shuffle(s, into: $0, elementSize: size) } }
                shuffled.withUnsafeBytes { s in back.withUnsafeMutableBytes { ByteShuffle.unshuffle(s, into: $0, elementSize: size) } }
                XCTAssertEqual(back, input, "count \(count) element \(size)")
            }
        }
        let floats: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8]
        var out = [UInt8](repeating: 0, count: 8)
        floats.withUnsafeBytes { s in out.withUnsafeMutableBytes { ByteShuffle.shuffle(s, into: $0, elementSize: 4) } }
        XCTAssertEqual(out, [1, 5, 2, 6, 3, 7, 4, 8])
    }

    func testBlobHeaderRecordsShuffle() throws {
        let values = (0..<1000).map { Float($0) * 0.001 }
        for shuffle in [false, true] {
            let blob = try values.withUnsafeBytes { try BlobCodec.encode($0, level: 3, shuffleElementSize: shuffle ? 4 : nil) }
            let header = try blob.withUnsafeBytes { try BlobCodec.header($0) }
            XCTAssertEqual(header.shuffled, shuffle)
            XCTAssertEqual(header.elementSize, shuffle ? 4 : 1)
            var back = [Float](repeating: 0, count: values.count)
            try blob.withUnsafeBytes { b in try back.withUnsafeMutableBytes { try BlobCodec.decode(b, into: $0) } }
            XCTAssertEqual(back, values)
            let unknown = try blob.withUnsafeBytes { try BlobCodec.decode($0, limit: 4000) }
            XCTAssertEqual(unknown, values.withUnsafeBytes { Array($0) })
            var bad = blob
            bad[5] = 2
            XCTAssertThrowsError(try bad.withUnsafeBytes { try BlobCodec.header($0) })
            XCTAssertThrowsError(try Array(blob.prefix(5)).withUnsafeBytes { try BlobCodec.header($0) })
        }
    }
}
