import XCTest
import LanguageModel
import TensorCore
@testable import Editing

/// The long-horizon meta-training machinery: the plateau curriculum, the episode draw and its loss
/// subsample, the signal cache, and a resume that continues the curriculum.
final class MetaTrainerTests: XCTestCase {
    static let folder = Bundle.module.resourceURL!.appendingPathComponent("Fixtures/gpt2-tiny")

    func makeTrainer(_ edit: (inout MetaTrainingConfig) -> Void, runDir: URL = FileManager.default.temporaryDirectory) throws -> MetaTrainer {
        let f = try ModelFolder.load(Self.folder, requireTokenizer: true)
        var cfg = EditorConfig()
        cfg.modules = ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_proj"]
        cfg.auxModel.layerN = 1; cfg.auxModel.innerAttDim = 8; cfg.auxModel.ffnDim = 12; cfg.auxModel.outerAttDim = 6
        cfg.auxModel.outerScoreAttDim = 4
        cfg.initEditLR = 0.05
        edit(&cfg.training)
        let e = try DAFNetEditor(config: cfg, model: f.model, tokenizer: f.tokenizer!)
        e.initialise(seed: 3)
        let subjects = ["Danielle Darrieux", "Toko Yasuda", "Lyon", "Ferrari", "Honda Civic", "Ivan Bunin", "Hans Zimmer", "Gazeta"]
        let pool = subjects.enumerated().map { i, s in
            EditRequest(prompt: "The mother tongue of \(s) is", targetNew: ["English", "French", "Polish"][i % 3],
                        rephrases: ["\(s) speaks"], locality: [.init(prompt: "The capital of France is", groundTruth: "Paris")])
        }
        return try MetaTrainer(editor: e, pool: pool, runDir: runDir)
    }

    /// n grows by max(25 %, 10) once the moving average has made no new minimum for patience/max(1, log10 n)
    /// steps, and never past max_seq.
    func testPlateauCurriculumGrowsOnAPlateau() throws {
        let t = try makeTrainer { $0.curriculum = .plateau; $0.plateauPatience = 5; $0.maxSeq = 25; $0.plateauDecay = 0.5 }
        XCTAssertEqual(t.longest, 1)
        for _ in 0..<5 { t.advanceCurriculum(reliabilityLoss: 1) }
        XCTAssertEqual(t.longest, 1, "the first value is a minimum; four steps without a new one are not yet five")
        t.advanceCurriculum(reliabilityLoss: 1)
        XCTAssertEqual(t.longest, 11)
        // At n = 11 the patience is 5 / log10(11) ≈ 4.8 steps; a falling loss keeps making new minima.
        for k in 0..<20 { t.advanceCurriculum(reliabilityLoss: 1 / Double(k + 2)) }
        XCTAssertEqual(t.longest, 11)
        for _ in 0..<6 { t.advanceCurriculum(reliabilityLoss: 1) }
        XCTAssertEqual(t.longest, 21)
        for _ in 0..<12 { t.advanceCurriculum(reliabilityLoss: 1) }
        XCTAssertEqual(t.longest, 25, "capped at max_seq")
    }

    /// Episode lengths are uniform in 1…longest, the losses are taken on at most loss_sample of the edits,
    /// and a step's draw is the same every time.
    func testEpisodeDrawAndLossSample() throws {
        let t = try makeTrainer { $0.curriculum = .linear; $0.maxSeq = 8; $0.growEvery = 1; $0.growBy = 100; $0.lossSample = 3 }
        var lengths = Set<Int>()
        for step in 1...200 {
            let d = t.sample(step: step)
            XCTAssertTrue((1...8).contains(d.requests.count))
            XCTAssertEqual(d.indices.count, d.requests.count)
            XCTAssertEqual(d.lossOn.count, min(d.requests.count, 3))
            XCTAssertEqual(Set(d.lossOn).count, d.lossOn.count)
            XCTAssertTrue(d.lossOn.allSatisfy { $0 < d.requests.count })
            lengths.insert(d.requests.count)
            let again = t.sample(step: step)
            XCTAssertEqual(again.indices, d.indices); XCTAssertEqual(again.lossOn, d.lossOn)
        }
        XCTAssertEqual(lengths, Set(1...8))
    }

    /// Signals from the cache (computed once per pool edit, in batches) are the editor's own signals of
    /// the sequence (up to float32 summation order of a differently padded batch: 1e-5 of the largest).
    func testCachedSignalsEqualFreshOnes() throws {
        let t = try makeTrainer { _ in }
        let indices = [3, 0, 5, 3]
        let requests = indices.map { t.pool[$0] }
        let cached = t.signals(poolIndices: indices, requests: requests)
        let fresh = t.editor.signals(requests)
        for m in t.editor.config.modules {
            XCTAssertEqual(cached[m]!.lengths, fresh[m]!.lengths, m)
            XCTAssertLessThan(cached[m]!.x.maxAbsDifference(fresh[m]!.x), 1e-5 * max(fresh[m]!.x.maxAbs(), 1e-6), m)
        }
    }

    /// A run stopped and resumed continues the curriculum and the parameters of the uninterrupted run.
    /// A stop request (what SIGTERM sets) ends the run after the current step with a checkpoint of that
    /// step, between two scheduled ones; the next run resumes there.
    func testStopRequestCheckpointsTheCurrentStep() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("meta-stop-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let settings: (inout MetaTrainingConfig) -> Void = { $0.maxSeq = 3; $0.steps = 10; $0.checkpointEvery = 100; $0.logEvery = 100 }
        let t = try makeTrainer(settings, runDir: dir)
        var asked = 0
        t.shouldStop = { asked += 1; return asked == 3 }
        XCTAssertEqual(try t.run(out: dir.appendingPathComponent("editor")), .interrupted(step: 3))
        XCTAssertTrue(MetaTrainer.hasCheckpoint(runDir: dir))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("editor").path))
        let log = try String(contentsOf: t.logURL, encoding: .utf8)
        XCTAssertTrue(log.contains("stopped by a signal at step 3"), log)
        let again = try makeTrainer(settings, runDir: dir)
        XCTAssertEqual(try again.run(out: dir.appendingPathComponent("editor"), stopAfter: 4), .stoppedAfter(step: 4))
        XCTAssertTrue(try String(contentsOf: t.logURL, encoding: .utf8).contains("resumed at step 3"))
    }

    func testResumeContinuesTheCurriculum() throws {
        let dirA = FileManager.default.temporaryDirectory.appendingPathComponent("meta-a-\(UUID().uuidString)")
        let dirB = FileManager.default.temporaryDirectory.appendingPathComponent("meta-b-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dirA); try? FileManager.default.removeItem(at: dirB) }
        let settings: (inout MetaTrainingConfig) -> Void = {
            $0.curriculum = .plateau; $0.plateauPatience = 2; $0.maxSeq = 30; $0.steps = 8; $0.lossSample = 2
            $0.checkpointEvery = 100; $0.logEvery = 4
        }
        let whole = try makeTrainer(settings, runDir: dirA)
        try whole.run(out: dirA.appendingPathComponent("editor"))
        let first = try makeTrainer(settings, runDir: dirB)
        try first.run(out: dirB.appendingPathComponent("editor"), stopAfter: 5)
        let second = try makeTrainer(settings, runDir: dirB)
        try second.run(out: dirB.appendingPathComponent("editor"))
        XCTAssertEqual(second.curriculum, whole.curriculum)
        XCTAssertGreaterThan(whole.curriculum.longest, 1, "the curriculum grew during the run")
        for (p, q) in zip(whole.editor.trainableParameters, second.editor.trainableParameters) {
            XCTAssertEqual(p.value.array, q.value.array, p.name)
        }
    }
}
