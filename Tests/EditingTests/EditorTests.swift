import XCTest
import LanguageModel
import TensorCore
@testable import Editing

final class EditorTests: XCTestCase {
    static let folder = Bundle.module.resourceURL!.appendingPathComponent("Fixtures/gpt2-tiny")

    func makeEditor(method: EditorMethod = .dafnet, seed: UInt64 = 3, signalRows: SignalRows = .all,
                    modules: [String] = ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"]) throws -> DAFNetEditor {
        let f = try ModelFolder.load(Self.folder, requireTokenizer: true)
        var cfg = EditorConfig()
        cfg.method = method
        cfg.modules = modules
        cfg.auxModel.layerN = 2; cfg.auxModel.innerAttDim = 8; cfg.auxModel.ffnDim = 12; cfg.auxModel.outerAttDim = 6
        cfg.auxModel.outerScoreAttDim = 4
        cfg.initEditLR = 0.05
        cfg.signalRows = signalRows
        let e = try DAFNetEditor(config: cfg, model: f.model, tokenizer: f.tokenizer!)
        e.initialise(seed: seed)
        return e
    }

    let requests = [
        EditRequest(prompt: "The mother tongue of Danielle Darrieux is", targetNew: "English", rephrases: ["Danielle Darrieux speaks"],
                    locality: [.init(prompt: "The capital of France is", groundTruth: "Paris")]),
        EditRequest(prompt: "Toko Yasuda plays the", targetNew: "piano", rephrases: ["Toko Yasuda is a"],
                    locality: [.init(prompt: "John Lennon performs on the", groundTruth: "guitar")]),
        EditRequest(prompt: "Autonomous University of Madrid is in", targetNew: "Sweden", rephrases: ["The university is located in"]),
    ]

    func testModulesShareANetworkPerShapeWithAModeEach() throws {
        let e = try makeEditor()
        XCTAssertEqual(Set(e.networks.keys), ["64x256", "256x64"])
        XCTAssertEqual(e.routing["transformer.h.1.mlp.c_fc"]!.mode, 0)
        XCTAssertEqual(e.routing["transformer.h.2.mlp.c_fc"]!.mode, 1)
        XCTAssertEqual(e.networks["64x256"]!.modes, 2)
        XCTAssertThrowsError(try { var c = e.config; c.modules = ["transformer.h.9.mlp.c_fc"]; _ = try DAFNetEditor(config: c, model: e.model, tokenizer: e.tokenizer) }())
    }

    /// Signal rows are the positions where u and δ are both non-zero, none of the padding. Before the last
    /// block δ reaches every input position through attention; in the last block's MLP only the positions
    /// that predict answer tokens have a gradient.
    func testSignalsCoverEachEditsPositions() throws {
        let e = try makeEditor()
        let edits = requests.map { e.scored($0.prompt, $0.targetNew) }
        let sig = e.signals(requests)
        XCTAssertEqual(sig["transformer.h.1.mlp.c_fc"]!.lengths, edits.map { $0.promptIds.count + $0.targetIds.count - 1 })
        for m in ["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"] {
            XCTAssertEqual(sig[m]!.lengths, edits.map { $0.targetIds.count }, m)
        }
        for m in e.config.modules { XCTAssertEqual(sig[m]!.x.shape[0], sig[m]!.lengths.reduce(0, +)) }
    }

    /// `signal_rows: subject` takes the rows of the subject's tokens (found by tokenizing the prompt up to
    /// the subject's start and end), `subject_last` its last token; an edit without a subject in its
    /// prompt falls back to the prompt's last token.
    func testSubjectSignalRowsAreTheSubjectsTokens() throws {
        let early = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
        // The last block cannot be edited at the subject: nothing after it carries the subject to the answer.
        XCTAssertThrowsError(try makeEditor(signalRows: .subject))
        let e = try makeEditor(signalRows: .subject, modules: early)
        let withSubject = [
            EditRequest(prompt: "The mother tongue of Danielle Darrieux is", targetNew: "English", subject: "Danielle Darrieux"),
            EditRequest(prompt: "Toko Yasuda plays the", targetNew: "piano", subject: "Toko Yasuda"),
            EditRequest(prompt: "Autonomous University of Madrid is in", targetNew: "Sweden", subject: "Lund University"),
            EditRequest(prompt: "Autonomous University of Madrid is in", targetNew: "Sweden"),
        ]
        let tok = e.tokenizer
        let darrieux = tok.encode("The mother tongue of").count..<tok.encode("The mother tongue of Danielle Darrieux").count
        let yasuda = 0..<tok.encode("Toko Yasuda").count
        XCTAssertGreaterThan(darrieux.count, 1); XCTAssertGreaterThan(yasuda.count, 1)
        let items = withSubject.map { e.scored($0.prompt, $0.targetNew) }
        let lastPrompt = items[2].promptIds.count - 1
        XCTAssertEqual(zip(withSubject, items).map { e.signalPositions($0, $1) },
                       [darrieux, yasuda, lastPrompt..<(lastPrompt + 1), lastPrompt..<(lastPrompt + 1)])
        let sig = e.signals(withSubject)
        XCTAssertEqual(sig["transformer.h.1.mlp.c_fc"]!.lengths, [darrieux.count, yasuda.count, 1, 1])
        // The rows are the rows of the whole-sequence signal at those positions.
        let all = try makeEditor(modules: early).signals([withSubject[0]])["transformer.h.1.mlp.c_fc"]!.x
        let w = all.shape[1], first = sig["transformer.h.1.mlp.c_fc"]!.x
        // (up to float32 summation order: the two calls pad their batches differently)
        for i in 0..<w { XCTAssertEqual(first.data[i], all.data[darrieux.lowerBound * w + i], accuracy: 1e-4) }
        let last = try makeEditor(signalRows: .subjectLast, modules: early)
        XCTAssertEqual(last.signals(withSubject)["transformer.h.1.mlp.c_proj"]!.lengths, [1, 1, 1, 1])
        XCTAssertEqual(last.signalPositions(withSubject[0], items[0]), (darrieux.upperBound - 1)..<darrieux.upperBound)
        // Edits apply and change the model under the subject rows too.
        let probe = e.scored(withSubject[0].prompt, "English")
        let before = e.model.predict([probe])[0].nll
        try e.apply([withSubject[0]], to: e.newState())
        XCTAssertNotEqual(e.model.predict([probe])[0].nll, before)
    }

    /// The inference path (a tape that records nothing: strided attention heads, memo of the past) gives
    /// the values of the recorded path that training differentiates, with and without a past.
    func testInferenceForwardMatchesTheRecordedOne() throws {
        let e = try makeEditor()
        let m = "transformer.h.2.mlp.c_fc"
        let (key, mode) = e.routing[m]!
        let net = e.networks[key]!
        let first = e.signals(Array(requests.prefix(2)))[m]!, next = e.signals([requests[2]])[m]!
        let start = net.forward(tape: Tape(), x: first.x, lengths: first.lengths, mode: mode, pastReps: nil, trainingNorm: false)
        for past in [nil, start.newReps] {
            let s = past == nil ? first : next
            let recorded = net.forward(tape: Tape(), x: s.x, lengths: s.lengths, mode: mode, pastReps: past, trainingNorm: false)
            let inferred = net.forward(tape: Tape(recording: false), x: s.x, lengths: s.lengths, mode: mode, pastReps: past, trainingNorm: false,
                                       memo: PastProjections(layers: net.config.layerN))
            XCTAssertLessThan(recorded.values.value.maxAbsDifference(inferred.values.value), 1e-5 * max(recorded.values.value.maxAbs(), 1))
            XCTAssertLessThan(recorded.x1.value.maxAbsDifference(inferred.x1.value), 1e-5 * max(recorded.x1.value.maxAbs(), 1))
            XCTAssertEqual(recorded.pastUpdateScale, inferred.pastUpdateScale, accuracy: 1e-6)
        }
    }

    /// The modules that share a network in one stacked call get what each gets in a call of its own, with
    /// and without a past (inference memo) and in the MEND-like ablation.
    func testStackedModulesEqualSeparateCalls() throws {
        let e = try makeEditor()
        let modules = ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc"]
        let net = e.networks[e.routing[modules[0]]!.key]!
        XCTAssertTrue(e.routing[modules[1]]!.key == e.routing[modules[0]]!.key)
        let first = e.signals(Array(requests.prefix(2))), next = e.signals([requests[2]])
        for fusion in [true, false] {
            let aloneMemos = modules.map { _ in PastProjections(layers: net.config.layerN) }
            let stackedMemos = modules.map { _ in PastProjections(layers: net.config.layerN) }
            var alonePast: [[Tensor]?] = [nil, nil], stackedPast: [[Tensor]?] = [nil, nil]
            for sig in [first, next] {
                let alone = modules.enumerated().map { i, m in
                    net.forward(tape: Tape(recording: false), x: sig[m]!.x, lengths: sig[m]!.lengths, mode: e.routing[m]!.mode,
                                pastReps: alonePast[i], trainingNorm: false, fusion: fusion, memo: fusion ? aloneMemos[i] : nil)
                }
                let stacked = net.forward(tape: Tape(recording: false), inputs: modules.enumerated().map { i, m in
                    AuxInput(x: sig[m]!.x, lengths: sig[m]!.lengths, mode: e.routing[m]!.mode, pastReps: stackedPast[i],
                             memo: fusion ? stackedMemos[i] : nil)
                }, trainingNorm: false, fusion: fusion)
                XCTAssertEqual(stacked.count, 2)
                for i in 0..<2 {
                    let a = alone[i], b = stacked[i]
                    XCTAssertEqual(a.values.shape, b.values.shape)
                    XCTAssertLessThan(a.values.value.maxAbsDifference(b.values.value), 1e-5 * max(a.values.value.maxAbs(), 1), modules[i])
                    XCTAssertLessThan(a.x1.value.maxAbsDifference(b.x1.value), 1e-5 * max(a.x1.value.maxAbs(), 1), modules[i])
                    XCTAssertEqual(a.pastUpdateScale, b.pastUpdateScale, accuracy: 1e-6)
                    XCTAssertEqual(a.updateScales.count, b.updateScales.count)
                    for (x, y) in zip(a.updateScales, b.updateScales) { XCTAssertEqual(x, y, accuracy: 1e-6) }
                    XCTAssertEqual(a.rowScales.count, b.rowScales.count)
                    for (x, y) in zip(a.newReps, b.newReps) { XCTAssertLessThan(x.maxAbsDifference(y), 1e-5 * max(x.maxAbs(), 1)) }
                    alonePast[i] = a.newReps; stackedPast[i] = b.newReps
                }
            }
        }
    }

    /// Applying edits one call at a time continues the sequence exactly as one call with all of them.
    func testSequentialEqualsOneCall() throws {
        let e = try makeEditor()
        let one = EditState(moduleNames: e.config.modules)
        try e.apply(requests, to: one)
        let seq = EditState(moduleNames: e.config.modules)
        for r in requests { try e.apply([r], to: seq) }
        XCTAssertEqual(seq.editCount, 3)
        for m in e.config.modules {
            let a = one.modules[m]!, b = seq.modules[m]!
            // Equal up to float32 summation order (1e-4 of the largest entry).
            XCTAssertLessThan(a.deltaWeight!.maxAbsDifference(b.deltaWeight!), 1e-4 * a.deltaWeight!.maxAbs(), m)
            XCTAssertLessThan(a.deltaBias!.maxAbsDifference(b.deltaBias!), 1e-4 * a.deltaBias!.maxAbs(), m)
            let pa = a.past!, pb = b.past!
            for l in 0..<2 {
                XCTAssertLessThan(pa.keys[l]!.maxAbsDifference(pb.keys[l]!), 1e-4)
                XCTAssertLessThan(pa.values[l]!.maxAbsDifference(pb.values[l]!), 1e-4)
                XCTAssertLessThan(pa.scoreKeys[l]!.maxAbsDifference(pb.scoreKeys[l]!), 1e-4)
            }
            let c = e.config.auxModel
            XCTAssertEqual(pa.rows, [3, 3], "one row per edit per layer")
            XCTAssertEqual(pa.keys.map { $0!.shape }, [[3, c.outerAttDim * c.outerAttHeadN], [3, c.outerAttDim * c.outerAttHeadN]])
            XCTAssertEqual(pa.scoreKeys.map { $0!.shape }, [[3, c.outerScoreAttDim * c.outerScoreAttHeadN], [3, c.outerScoreAttDim * c.outerScoreAttHeadN]])
        }
    }

    func testEditChangesTheModelAndStateRoundTrips() throws {
        let e = try makeEditor()
        let probe = e.scored(requests[0].prompt, requests[0].targetNew)
        let before = e.model.predict([probe])[0].nll
        let state = EditState(moduleNames: e.config.modules)
        try e.apply(Array(requests.prefix(2)), to: state)
        let after = e.model.predict([probe])[0].nll
        XCTAssertNotEqual(before, after)
        let back = try EditState(moduleNames: e.config.modules, tensors: state.tensors())
        XCTAssertEqual(back.editCount, 2)
        e.model.clearEdits()
        e.install(back)
        XCTAssertEqual(e.model.predict([probe])[0].nll, after, accuracy: 1e-9)
        XCTAssertThrowsError(try EditState(moduleNames: ["x"], tensors: state.tensors()))
    }

    func testEditorSavesAndLoads() throws {
        let e = try makeEditor()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("editor-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        e.editLRs["transformer.h.2.mlp.c_proj"]!.value[0] = 0.123
        try e.save(to: dir)
        let f = try ModelFolder.load(Self.folder, requireTokenizer: true)
        let back = try DAFNetEditor.load(from: dir, model: f.model, tokenizer: f.tokenizer!)
        XCTAssertEqual(back.editLRs["transformer.h.2.mlp.c_proj"]!.value[0], 0.123)
        let s1 = EditState(moduleNames: e.config.modules), s2 = EditState(moduleNames: e.config.modules)
        try e.apply(requests, to: s1)
        try back.apply(requests, to: s2)
        for m in e.config.modules { XCTAssertEqual(s1.modules[m]!.deltaWeight!.maxAbsDifference(s2.modules[m]!.deltaWeight!), 0) }
    }

    func testMENDKeepsThePastWholeAndNoRepresentations() throws {
        let e = try makeEditor(method: .mend)
        let s = EditState(moduleNames: e.config.modules)
        try e.apply([requests[0]], to: s)
        let first = s.modules["transformer.h.2.mlp.c_fc"]!.deltaWeight!.copy()
        try e.apply([requests[1]], to: s)
        let two = EditState(moduleNames: e.config.modules)
        try e.apply([requests[1]], to: two)
        // Plain accumulation: ΔW(1, 2) = ΔW(1) + ΔW(2).
        let sum = first + two.modules["transformer.h.2.mlp.c_fc"]!.deltaWeight!
        XCTAssertLessThan(s.modules["transformer.h.2.mlp.c_fc"]!.deltaWeight!.maxAbsDifference(sum), 1e-5 * sum.maxAbs())
        XCTAssertTrue(s.modules.values.allSatisfy { $0.past == nil })
    }

    /// The state keeps the past as the fusion attention's projections: a state stored and restored, or one
    /// stored before (with the past's representations, projected by the editor that restores it), continues
    /// the sequence exactly as the one in memory, to the bit.
    func testStoredPastContinuesExactly() throws {
        let e = try makeEditor()
        let s = EditState(moduleNames: e.config.modules)
        try e.apply([requests[0], requests[1]], to: s)
        var legacy = s.tensors().filter { !$0.key.hasPrefix("past.") }
        XCTAssertEqual(s.tensors().keys.filter { $0.hasPrefix("past.") }.count, e.config.modules.count * 2 * 3)
        // The representations the earlier layout stored: the networks' own, for the same (stacked) call with a
        // memo, as the editor made them.
        let sig = e.signals([requests[0], requests[1]])
        for (key, modules) in e.modulesOfNetwork {
            let net = e.networks[key]!
            let outs = net.forward(tape: Tape(recording: false), inputs: modules.map { m in
                AuxInput(x: sig[m]!.x, lengths: sig[m]!.lengths, mode: e.routing[m]!.mode, pastReps: nil,
                         memo: PastProjections(layers: net.config.layerN))
            }, trainingNorm: false)
            for (m, out) in zip(modules, outs) { for (l, r) in out.newReps.enumerated() { legacy["reps.\(m).\(l)"] = r } }
        }
        let stored = try e.restoreState(s.tensors()) as! EditState
        let converted = try e.restoreState(legacy) as! EditState
        for m in e.config.modules {
            for l in 0..<2 {
                XCTAssertEqual(converted.modules[m]!.past!.keys[l]!.array, s.modules[m]!.past!.keys[l]!.array, m)
                XCTAssertEqual(converted.modules[m]!.past!.scoreKeys[l]!.array, s.modules[m]!.past!.scoreKeys[l]!.array, m)
            }
        }
        XCTAssertEqual(Set(converted.tensors().keys), Set(s.tensors().keys), "stored again in the new layout")
        for state in [stored, converted] { try e.apply([requests[2]], to: state) }
        try e.apply([requests[2]], to: s)
        for m in e.config.modules {
            XCTAssertEqual(stored.modules[m]!.deltaWeight!.array, s.modules[m]!.deltaWeight!.array, m)
            XCTAssertEqual(converted.modules[m]!.deltaWeight!.array, s.modules[m]!.deltaWeight!.array, m)
        }
        let back = s.tensors()
        for (name, t) in stored.tensors() { XCTAssertEqual(t.array, back[name]?.array, name) }
    }

    /// The meta-gradient — through the networks, ΔW, the edited model's losses and back — against
    /// finite differences of the episode loss, for entries of several parameters and an edit rate.
    func testMetaGradientMatchesFiniteDifferences() throws {
        let e = try makeEditor(seed: 5)
        var cfg = e.config
        cfg.training.reliaLambda = 1; cfg.training.genLambda = 1; cfg.training.locLambda = 1
        let editor = try DAFNetEditor(config: cfg, model: e.model, tokenizer: e.tokenizer)
        for (k, net) in e.networks { for (p, q) in zip(net.parameters, editor.networks[k]!.parameters) { q.value.assign(p.value) } }
        let trainer = try MetaTrainer(editor: editor, pool: requests, runDir: FileManager.default.temporaryDirectory)
        let net = editor.networks["64x256"]!
        try checkMetaGradient(trainer, requests, parameters: [
            net.parameter("dafnet_model.layers.0.inner_att.trans1.0.weight")!,
            net.parameter("dafnet_model.layers.1.feedforward.fc2.weight")!,
            net.parameter("dafnet_model.layers.0.outer_att.lv.weight")!,
            net.parameter("dafnet_model.layers.1.mode_scale.weight")!,
            editor.networks["256x64"]!.parameter("dafnet_model.layers.0.layer_norm2.bias")!,
            editor.editLRs["transformer.h.2.mlp.c_proj"]!])
        XCTAssertGreaterThan(abs(Double(editor.editLRs["transformer.h.2.mlp.c_proj"]!.grad[0])), 0)
    }
}
