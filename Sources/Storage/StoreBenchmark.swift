import Foundation
import TensorCore

/// One configuration of `dafnet bench store`.
public struct StoreBenchmarkResult: Codable, Sendable {
    public var level: Int32
    public var shuffle: Bool
    public var rawBytes: Int
    public var storedBytes: Int
    /// raw / stored.
    public var ratio: Double
    /// Commit to a fresh store (compress, hash, write, fsync, rename), MB/s of raw state (1 MB = 10^6 B).
    public var writeMBps: Double
    /// Load and verify (read, re-hash, decompress, unshuffle, state hash), MB/s of raw state.
    public var readMBps: Double
    /// Compress and hash only, in memory, MB/s.
    public var encodeMBps: Double

    enum CodingKeys: String, CodingKey {
        case level, shuffle, rawBytes, storedBytes, ratio
        case writeMBps = "writeMbPerS"
        case readMBps = "readMbPerS"
        case encodeMBps = "encodeMbPerS"
    }
}

/// Store throughput and compression on an edit state shaped like DAFNet's.
public enum StoreBenchmark {
    /// A stand-in for a small GPT-2's edited MLP modules until the real editor writes states: for
    /// each of `blocks` blocks, `c_fc` ΔW [d, 4d] and Δb [4d], `c_proj` ΔW [4d, d] and Δb [d]. Each ΔW
    /// is a sum of `rank` outer products (DAFNet's ΔW = Σ x1ᵀ x2 over edited tokens) plus small noise.
    public static func syntheticEditState(blocks: Int = 3, dModel: Int = 256, rank: Int = 8, noise: Float = 0.01,
                                          seed: UInt64 = 42) -> [String: Tensor] {
        var rng = RNG(seed: seed)
        var out: [String: Tensor] = [:]
        let dFF = 4 * dModel
        for b in 0..<blocks {
            for (module, rows, cols) in [("c_fc", dModel, dFF), ("c_proj", dFF, dModel)] {
                let w = Tensor(shape: [rows, cols])
                let p = w.data
                let u = UnsafeMutablePointer<Float>.allocate(capacity: rows)
                let v = UnsafeMutablePointer<Float>.allocate(capacity: cols)
                defer { u.deallocate(); v.deallocate() }
                for _ in 0..<rank {
                    for i in 0..<rows { u[i] = rng.normal() * 0.02 }
                    for j in 0..<cols { v[j] = rng.normal() * 0.05 }
                    for i in 0..<rows {
                        let ui = u[i]
                        let row = p + i * cols
                        for j in 0..<cols { row[j] += ui * v[j] }
                    }
                }
                var scale: Float = 0
                for i in 0..<(rows * cols) { scale = max(scale, abs(p[i])) }
                for i in 0..<(rows * cols) { p[i] += rng.normal() * noise * scale }
                out["transformer.h.\(b).mlp.\(module).delta_weight"] = w
                let bias = Tensor(shape: [cols])
                for j in 0..<cols { bias.data[j] = rng.normal() * 1e-3 }
                out["transformer.h.\(b).mlp.\(module).delta_bias"] = bias
            }
        }
        return out
    }

    /// Measures every level × shuffle combination, the median of `repeats` runs each, in fresh
    /// stores under `directory` (a temporary folder by default).
    public static func run(tensors: [String: Tensor], levels: [Int32] = [1, 3, 9], shuffles: [Bool] = [false, true],
                           repeats: Int = 3, directory: URL? = nil) throws -> [StoreBenchmarkResult] {
        let base = (directory ?? FileManager.default.temporaryDirectory)
            .appendingPathComponent("dafnet-bench-store-" + FileUtil.randomSuffix())
        try storeIO { try FileUtil.makeDirectories(base.path) }
        defer { try? FileUtil.removeTree(base.path) }
        let raw = tensors.values.reduce(0) { $0 + $1.count * 4 }
        var results: [StoreBenchmarkResult] = []
        var run = 0
        for level in levels {
            for shuffle in shuffles {
                var writes: [Double] = [], reads: [Double] = [], encodes: [Double] = []
                var stored = 0
                for _ in 0..<max(1, repeats) {
                    run += 1
                    let config = StoreConfiguration(compressionLevel: level, shuffle: shuffle)
                    let store = try CheckpointStore(at: base.appendingPathComponent("s\(run)"), create: true, configuration: config)
                    var t0 = DispatchTime.now().uptimeNanoseconds
                    let manifest = try store.commit(CommitRequest(tensors: tensors))
                    writes.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
                    stored = manifest.tensors.reduce(0) { $0 + $1.storedBytes }
                    t0 = DispatchTime.now().uptimeNanoseconds
                    _ = try store.load()
                    reads.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
                    t0 = DispatchTime.now().uptimeNanoseconds
                    for t in tensors.values {
                        let blob = try BlobCodec.encode(UnsafeRawBufferPointer(start: t.data, count: t.count * 4), level: level,
                                                        shuffleElementSize: shuffle ? 4 : nil)
                        _ = blob.withUnsafeBytes { Hex.sha256($0) }
                    }
                    encodes.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
                    try? FileUtil.removeTree(store.rootPath)
                }
                func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }
                let mb = Double(raw) / 1e6
                results.append(StoreBenchmarkResult(level: level, shuffle: shuffle, rawBytes: raw, storedBytes: stored,
                                                    ratio: Double(raw) / Double(max(stored, 1)),
                                                    writeMBps: mb / median(writes), readMBps: mb / median(reads),
                                                    encodeMBps: mb / median(encodes)))
            }
        }
        return results
    }

    /// A plain-text table of results.
    public static func table(_ results: [StoreBenchmarkResult]) -> String {
        var lines = ["level  shuffle  raw MB  stored MB   ratio  write MB/s  read MB/s  encode MB/s"]
        for r in results {
            let shuffle = (r.shuffle ? "yes" : "no").padding(toLength: 7, withPad: " ", startingAt: 0)
            lines.append(String(format: "%5d  ", r.level) + shuffle + String(format: "  %6.2f  %9.2f  %6.3f  %10.1f  %9.1f  %11.1f",
                                Double(r.rawBytes) / 1e6, Double(r.storedBytes) / 1e6, r.ratio, r.writeMBps, r.readMBps, r.encodeMBps))
        }
        return lines.joined(separator: "\n")
    }
}
