import Editing
import Foundation
import Storage
import TensorCore
import Tokenizers

/// The parsers that read what users and other programs hand us, each as a function of raw bytes that
/// must never crash, hang or read out of bounds, whatever the bytes (errors are the expected outcome).
/// `scripts/fuzz.sh` runs them under libFuzzer and AddressSanitizer; without `FUZZING` this executable
/// replays corpora (`dafnet-fuzz replay DIR…`, a regression test) and writes their seeds.
enum Harness: String, CaseIterable {
    /// A JSON Lines edit batch (`EditBatch`).
    case batch
    /// A safetensors file: header, then every tensor read.
    case safetensors
    /// A store blob: header and zstd frame.
    case blob
    /// A `.tar.zst` checkpoint archive restored into an empty store.
    case archive
    /// A `tokenizer.json`, then a text encoded and decoded with it.
    case tokenizer

    func run(_ data: Data) {
        switch self {
        case .batch:
            _ = try? EditBatch.parseNumbered(data, file: "fuzz", requireFinalNewline: true)
        case .safetensors:
            guard let f = try? SafetensorsFile(data: data) else { return }
            for name in f.tensorNames { _ = try? f.tensor(name) }
        case .blob:
            data.withUnsafeBytes { _ = try? BlobCodec.decode($0, limit: 1 << 24) }
        case .archive:
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("dafnet-fuzz-\(getpid())-\(UInt64.random(in: 0...UInt64.max))")
            defer { try? FileManager.default.removeItem(at: dir) }
            guard (try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)) != nil else { return }
            let file = dir.appendingPathComponent("a.tar.zst")
            guard (try? data.write(to: file)) != nil, let store = try? CheckpointStore(at: dir.appendingPathComponent("store"), create: true) else { return }
            _ = try? CheckpointArchive.restore(from: file, into: store,
                                              limits: ArchiveLimits(maxTotalBytes: 64 << 20, maxEntryBytes: 16 << 20, maxEntries: 10_000))
        case .tokenizer:
            guard let t = try? Tokenizer(tokenizerJSON: data) else { return }
            _ = t.decode(t.encode("The mother tongue of Danielle Darrieux is English. ünïcode 123"))
        }
    }

    /// Valid inputs to start from, built with the project's own writers and its fixtures (`root`: the
    /// repository).
    func seeds(root: URL) throws -> [(String, Data)] {
        switch self {
        case .batch:
            let inbox = root.appendingPathComponent("samples/inbox")
            return try FileManager.default.contentsOfDirectory(atPath: inbox.path).sorted().filter { $0.hasSuffix(".jsonl") }.prefix(4)
                .map { ($0, try Data(contentsOf: inbox.appendingPathComponent($0))) }
        case .safetensors:
            var w = SafetensorsWriter(metadata: ["format": "pt"])
            try w.add("a", Tensor(shape: [2, 3], values: [1, 2, 3, 4, 5, 6]))
            try w.add("b", Tensor(shape: [4], values: [0.5, -1, 2, 3]), as: .F16)
            try w.add("c", integers: [1, 2, 3], shape: [3], as: .I64)
            return [("small.safetensors", try w.encoded())]
        case .blob:
            let values: [Float] = (0..<64).map { Float($0) * 0.25 }
            let raw = values.withUnsafeBytes { Data($0) }
            return try [("shuffled.blob", Data(raw.withUnsafeBytes { try BlobCodec.encode($0, level: 3, shuffleElementSize: 4) })),
                        ("plain.blob", Data(Data("edit_log line\n".utf8).withUnsafeBytes { try BlobCodec.encode($0, level: 1) }))]
        case .archive:
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("dafnet-fuzz-seed-\(getpid())")
            defer { try? FileManager.default.removeItem(at: dir) }
            let store = try CheckpointStore(at: dir.appendingPathComponent("store"), create: true)
            try store.commit(CommitRequest(tensors: ["delta_weight.m": Tensor(shape: [2, 2], values: [1, 2, 3, 4])],
                                           files: ["edit_log.000000.jsonl": Data("{\"prompt\":\"a\",\"target_new\":\"b\"}\n".utf8)]))
            try store.commit(CommitRequest(tensors: ["delta_weight.m": Tensor(shape: [2, 2], values: [1, 2, 3, 5])]))
            let out = dir.appendingPathComponent("v2.tar.zst")
            try CheckpointArchive.create(store: store, version: .head, to: out)
            return [("v2.tar.zst", try Data(contentsOf: out))]
        case .tokenizer:
            let fixtures = root.appendingPathComponent("Tests/TokenizersTests/Fixtures")
            return try ["gpt2-tiny", "llama-tiny"].map { ("\($0).json", try Data(contentsOf: fixtures.appendingPathComponent("\($0)/tokenizer.json"))) }
        }
    }
}
