import XCTest
import Storage
@testable import LanguageModel

/// Pre-training resumes exactly: an interrupted run continued from its checkpoint ends with the same
/// weights, bit for bit, as an uninterrupted one.
final class PretrainerTests: XCTestCase {
    func testResumeEqualsUninterruptedRun() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("pretrain-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: root) }
        var cfg = PretrainConfig()
        cfg.vocabSize = 300; cfg.nEmbd = 16; cfg.nLayer = 1; cfg.nHead = 2; cfg.nPositions = 32
        cfg.batchSize = 2; cfg.seqLen = 16; cfg.warmupSteps = 2; cfg.checkpointEvery = 1000; cfg.logEvery = 2
        let sentences = (0..<60).map { "Fact number \($0 % 17) says the colour of item \($0) is \(["red", "green", "blue"][$0 % 3])." }
        func train(_ name: String, stops: [Int?]) throws -> URL {
            let out = root.appendingPathComponent(name + "-model")
            for stop in stops {
                try Pretrainer(config: cfg, runDir: root.appendingPathComponent(name)).run(sentences: sentences, out: out, stopAfter: stop)
            }
            return out
        }
        let a = try train("straight", stops: [nil])
        let b = try train("resumed", stops: [3, nil])
        let log = try String(contentsOf: root.appendingPathComponent("resumed/train.log"), encoding: .utf8)
        XCTAssertTrue(log.contains("stopped at step 3") && log.contains("resumed at step 3"), log)
        let wa = try SafetensorsFile(contentsOf: a.appendingPathComponent("model.safetensors")).allTensors()
        let wb = try SafetensorsFile(contentsOf: b.appendingPathComponent("model.safetensors")).allTensors()
        XCTAssertEqual(Set(wa.keys), Set(wb.keys))
        for (k, t) in wa { XCTAssertEqual(t.maxAbsDifference(wb[k]!), 0, k) }
        // The result is a loadable HF folder with its tokenizer, and training moved the weights.
        let folder = try ModelFolder.load(a, requireTokenizer: true)
        XCTAssertEqual(folder.model.spec.hidden, 16)
        XCTAssertFalse(folder.tokenizer!.encode("the colour of item").isEmpty)
        XCTAssertTrue(log.contains("loss"))
    }

    func testPackingMasksPaddingAndKeepsSentenceStarts() {
        let p = PackedCorpus(sentences: [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], T: 6, eos: 0)
        // [1 2 3 0 4 5 0] then [6 7 8 9 10 0 0]
        XCTAssertEqual(p.count, 2)
        XCTAssertEqual(Array(p.tokens[0..<7]), [1, 2, 3, 0, 4, 5, 0])
        XCTAssertEqual(Array(p.tokens[7..<14]), [6, 7, 8, 9, 10, 0, 0])
        XCTAssertEqual(Array(p.mask[6..<12]), [1, 1, 1, 1, 1, 0], "the padding after the end-of-text label is masked")
    }
}
