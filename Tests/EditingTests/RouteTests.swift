import XCTest
import LanguageModel
import Storage
import TensorCore
@testable import Editing

/// `route_threshold`: the edits apply from the first position near an edit's key (its subject), the keys
/// travel with the state, and every path that installs a state routes the same way.
final class RouteTests: XCTestCase {
    let edit = EditRequest(prompt: "The mother tongue of Danielle Darrieux is", targetNew: "English", subject: "Danielle Darrieux",
                           rephrases: ["Danielle Darrieux speaks"])
    let other = EditRequest(prompt: "Toko Yasuda plays the", targetNew: "piano", subject: "Toko Yasuda")

    func makeEditor(threshold: Float? = 0.9) throws -> DAFNetEditor { try LeastSquaresTests.editor(routeThreshold: threshold) }

    func logits(_ model: TransformerLM, _ text: String, _ tokenizer: (String) -> [Int]) -> Tensor {
        model.forward(TokenBatch(tokenizer(text))).copy()
    }

    func testRoutedEditChangesItsSubjectsPromptsOnly() throws {
        let e = try makeEditor()
        let enc = { (t: String) in e.tokenizer.encode(t) }
        let texts = ["The mother tongue of Danielle Darrieux is English", "Danielle Darrieux speaks English",
                     "The capital of France is Paris", "The mother tongue of Léon Blum is French"]
        let before = texts.map { logits(e.model, $0, enc) }
        let state = EditState(moduleNames: e.config.modules)
        try e.apply([edit], to: state)
        XCTAssertEqual(state.router?.keys.shape, [3, e.model.spec.hidden], "three keys: the subject in its prompt and alone (twice)")
        XCTAssertEqual(state.router?.layer, 1)
        XCTAssertEqual(state.router?.site, .mlpInput)
        let after = texts.map { logits(e.model, $0, enc) }
        // The subject's prompt: unedited up to the subject, edited from its last token on.
        let subjectEnd = enc("The mother tongue of Danielle Darrieux").count
        XCTAssertEqual(after[0].rows(0..<(subjectEnd - 1)).maxAbsDifference(before[0].rows(0..<(subjectEnd - 1))), 0, accuracy: 1e-5)
        XCTAssertGreaterThan(after[0].maxAbsDifference(before[0]), 1e-3)
        XCTAssertGreaterThan(after[1].maxAbsDifference(before[1]), 1e-3, "the subject read alone at the start routes too")
        XCTAssertEqual(after[2].maxAbsDifference(before[2]), 0, accuracy: 1e-5, "a text without the subject is unedited")
        XCTAssertEqual(after[3].maxAbsDifference(before[3]), 0, accuracy: 1e-5, "a neighbour (same relation) is unedited")

        // Unrouted, the same edit moves the other texts too (what the routing holds still).
        let plain = try makeEditor(threshold: nil)
        try plain.apply([edit], to: EditState(moduleNames: plain.config.modules))
        XCTAssertGreaterThan(logits(plain.model, texts[2], enc).maxAbsDifference(before[2]), 1e-3)
    }

    func testRouterTravelsWithTheStateAndInstallsEverywhere() throws {
        let e = try makeEditor()
        let enc = { (t: String) in e.tokenizer.encode(t) }
        let state = EditState(moduleNames: e.config.modules)
        try e.apply([edit], to: state)
        let restored = try EditState(moduleNames: e.config.modules, tensors: state.tensors())
        XCTAssertEqual(restored.router!.keys.array, state.router!.keys.array)
        XCTAssertEqual(restored.router!.whitening.array, state.router!.whitening.array)
        XCTAssertEqual(restored.router!.threshold, 0.9)
        try e.apply([other], to: state)
        try e.apply([other], to: restored)
        XCTAssertEqual(restored.router!.keys.shape[0], 6)
        XCTAssertEqual(restored.router!.keys.array, state.router!.keys.array)
        let text = "The mother tongue of Danielle Darrieux is English"
        let viaEditor = logits(e.model, text, enc)
        // The state alone (generate --store, facts --store): the same routed model.
        let folder = try ModelFolder.load(LeastSquaresTests.folder, requireTokenizer: true)
        try EditedModelExport.install(state.tensors(), on: folder.model)
        XCTAssertNotNil(folder.model.router)
        XCTAssertEqual(logits(folder.model, text, enc).maxAbsDifference(viaEditor), 0, accuracy: 1e-5)
        // A model folder cannot hold the routing: export refuses unless told to merge for every input.
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("routed-export-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: out) }
        XCTAssertThrowsError(try EditedModelExport.export(model: folder, state: state.tensors(), to: out)) { error in
            XCTAssertEqual(error as? EditingError, .routedExport)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path), "nothing written")
        try EditedModelExport.export(model: folder, state: state.tensors(), to: out, unrouted: true)
        XCTAssertNil(try ModelFolder.load(out).model.router)
        // Damaged router tensors are named.
        var bad = state.tensors()
        bad[RouteTensors.whitening] = nil
        XCTAssertThrowsError(try EditState(moduleNames: e.config.modules, tensors: bad)) { error in
            XCTAssertTrue("\(error)".contains(RouteTensors.whitening), "\(error)")
        }
    }

    /// Each key keeps the threshold it was added with: a state continued by an editor with another
    /// threshold routes its earlier edits as before; a state written before per-key thresholds gives every
    /// key the one threshold it stored; a damaged thresholds tensor is named.
    func testKeysKeepTheirThresholdsAcrossEditors() throws {
        let strict = try makeEditor(threshold: 0.9), loose = try makeEditor(threshold: 0.5)
        let state = EditState(moduleNames: strict.config.modules)
        try strict.apply([edit], to: state)
        try loose.apply([other], to: state)
        XCTAssertEqual(state.router!.keyThresholds, [0.9, 0.9, 0.9, 0.5, 0.5, 0.5])
        XCTAssertEqual(state.router!.threshold, 0.5)
        let restored = try EditState(moduleNames: strict.config.modules, tensors: state.tensors())
        XCTAssertEqual(restored.router!.keyThresholds, state.router!.keyThresholds)
        var old = state.tensors()
        old[RouteTensors.thresholds] = nil
        XCTAssertEqual(try EditState(moduleNames: strict.config.modules, tensors: old).router!.keyThresholds, [Float](repeating: 0.5, count: 6))
        var bad = state.tensors()
        bad[RouteTensors.thresholds] = Tensor(shape: [5], repeating: 0.5)
        XCTAssertThrowsError(try EditState(moduleNames: strict.config.modules, tensors: bad)) { error in
            XCTAssertTrue("\(error)".contains(RouteTensors.thresholds), "\(error)")
        }
    }

    func testConfigIsChecked() throws {
        func decode(_ json: String) throws -> EditorConfig { try JSONDecoder().decode(EditorConfig.self, from: Data(json.utf8)) }
        XCTAssertEqual(try decode(#"{"route_threshold": 0.7}"#).routeThreshold, 0.7)
        XCTAssertNil(try decode("{}").routeThreshold)
        XCTAssertThrowsError(try decode(#"{"route_threshold": 1.5}"#)) { error in
            XCTAssertTrue("\(error)".contains("route_threshold"), "\(error)")
        }
        // The router reads the stream the lowest edited module reads: an output projection there cannot route.
        let e = try LeastSquaresTests.editor(modules: ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_fc"], routeThreshold: 0.8)
        XCTAssertThrowsError(try e.routeSite()) { error in
            XCTAssertTrue("\(error)".contains("transformer.h.1.mlp.c_proj"), "\(error)")
        }
    }

    /// Meta-training with routing: the losses go through the routed model and ΔW's gradient comes only from
    /// the routed rows; the meta-gradient matches finite differences of the episode loss, and differs from
    /// the unrouted one (so the route is what is checked).
    func testRoutedMetaGradientMatchesFiniteDifferences() throws {
        let e = try LeastSquaresTests.editor(seed: 5)
        var cfg = e.config
        cfg.training.reliaLambda = 1; cfg.training.genLambda = 1; cfg.training.locLambda = 1
        let subjects = ["Danielle Darrieux", "Toko Yasuda", "Autonomous University of Madrid"]
        let requests = zip(LeastSquaresTests.requests, subjects).map { r, s -> EditRequest in var r = r; r.subject = s; return r }
        func trainer(_ threshold: Float?) throws -> MetaTrainer {
            var c = cfg
            c.routeThreshold = threshold
            let editor = try DAFNetEditor(config: c, model: e.model, tokenizer: e.tokenizer)
            try editor.warmStart(from: e)
            try editor.setKeyStatistics(e.keyStatistics)
            return try MetaTrainer(editor: editor, pool: requests, runDir: FileManager.default.temporaryDirectory)
        }
        let routed = try trainer(0.9), plain = try trainer(nil)
        let name = "dafnet_model.layers.1.feedforward.fc2.weight"
        func gradient(_ t: MetaTrainer) throws -> Tensor {
            for p in t.editor.trainableParameters { p.grad.zero() }
            _ = try t.episode(requests, trainingNorm: false)
            return t.editor.networks["64x256"]!.parameter(name)!.grad.copy()
        }
        let g = try gradient(routed), h = try gradient(plain)
        XCTAssertGreaterThan(g.maxAbsDifference(h), 0.05 * g.maxAbs(), "routing changes the meta-gradient")
        XCTAssertNil(e.model.router, "the episode leaves the model unedited and unrouted")
        let net = routed.editor.networks["64x256"]!
        try checkMetaGradient(routed, requests, parameters: [
            net.parameter(name)!, routed.editor.editLRs["transformer.h.2.mlp.c_proj"]!,
            routed.editor.logLambdas["transformer.h.2.mlp.c_fc"]!])
    }
}
