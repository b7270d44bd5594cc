import XCTest
import LanguageModel
import TensorCore
@testable import Editing

/// The `least_squares` accumulation rule: the normal equations it solves, its sequence semantics, its
/// state and its meta-gradient.
final class LeastSquaresTests: XCTestCase {
    static let folder = Bundle.module.resourceURL!.appendingPathComponent("Fixtures/gpt2-tiny")

    var requests: [EditRequest] { Self.requests }

    static let requests = [
        EditRequest(prompt: "The mother tongue of Danielle Darrieux is", targetNew: "English", rephrases: ["Danielle Darrieux speaks"],
                    locality: [.init(prompt: "The capital of France is", groundTruth: "Paris")]),
        EditRequest(prompt: "Toko Yasuda plays the", targetNew: "piano", rephrases: ["Toko Yasuda is a"],
                    locality: [.init(prompt: "John Lennon performs on the", groundTruth: "guitar")]),
        EditRequest(prompt: "Autonomous University of Madrid is in", targetNew: "Sweden", rephrases: ["The university is located in"],
                    locality: [.init(prompt: "The Eiffel Tower is in", groundTruth: "Paris")]),
    ]

    var preserved: [String] { TestTexts.preserved }

    func makeEditor(lambda: Float = 2, seed: UInt64 = 3, contrast: Int = 0, contrastWeight: Float = 1) throws -> DAFNetEditor {
        try Self.editor(lambda: lambda, seed: seed, contrast: contrast, contrastWeight: contrastWeight)
    }

    /// A `least_squares` editor of gpt2-tiny's blocks 1–2 with key statistics from the preserved texts.
    static func editor(lambda: Float = 2, lambdaScale: Float = 1, seed: UInt64 = 3, contrast: Int = 0, contrastWeight: Float = 1,
                       modules: [String] = ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"],
                       routeThreshold: Float? = nil, method: EditorMethod = .dafnet, shardEdits: Int? = nil) throws -> DAFNetEditor {
        let f = try ModelFolder.load(Self.folder, requireTokenizer: true)
        var cfg = EditorConfig()
        cfg.method = method
        cfg.modules = modules
        cfg.routeThreshold = routeThreshold
        cfg.lsShardEdits = shardEdits
        cfg.auxModel.layerN = 2; cfg.auxModel.innerAttDim = 8; cfg.auxModel.ffnDim = 12; cfg.auxModel.outerAttDim = 6
        cfg.auxModel.outerScoreAttDim = 4
        cfg.initEditLR = 0.5
        cfg.editBias = false
        cfg.accumulation = .leastSquares
        cfg.lsLambda = lambda
        cfg.lsLambdaScale = lambdaScale
        cfg.contrastSubjects = contrast; cfg.contrastWeight = contrastWeight
        let e = try DAFNetEditor(config: cfg, model: f.model, tokenizer: f.tokenizer!)
        e.initialise(seed: seed)
        let (stats, tokens) = LeastSquares.keyStatistics(model: f.model, tokenizer: f.tokenizer!, modules: cfg.modules, texts: TestTexts.preserved)
        XCTAssertGreaterThan(tokens, 20)
        try e.setKeyStatistics(stats)
        return e
    }

    /// Contrast prompts: the edit's prompt with `contrast_subjects` other subjects (never its own), the same
    /// ones on every call; their rows at every position, scaled by √weight, join Σ uuᵀ and stay in the state;
    /// the subject list travels with the editor folder, and an editor that needs one and has none is refused.
    func testContrastRowsJoinTheGram() throws {
        let e = try makeEditor(contrast: 2, contrastWeight: 4)
        e.subjects = ["Danielle Darrieux", "Toko Yasuda", "Lund University", "Marie Curie"]
        let r = EditRequest(prompt: "The mother tongue of Danielle Darrieux is", targetNew: "English", subject: "Danielle Darrieux")
        let prompts = e.contrastPrompts(r)
        XCTAssertEqual(prompts.count, 2)
        XCTAssertEqual(Set(prompts).count, 2)
        XCTAssertEqual(prompts, e.contrastPrompts(r))
        for p in prompts {
            XCTAssertTrue(p.hasPrefix("The mother tongue of ") && p.hasSuffix(" is") && !p.contains("Darrieux"), p)
        }
        XCTAssertEqual(e.contrastPrompts(EditRequest(prompt: r.prompt, targetNew: "English")), [], "no subject, no contrast")
        let rows = e.contrastRows([r])
        let tokens = prompts.map { e.tokenizer.encode($0).count }.reduce(0, +)
        for m in e.config.modules { XCTAssertEqual(rows[m]!.shape, [tokens, e.model.linears[m]!.inFeatures], m) }
        // The first row is the module's input at the first token of the first contrast prompt, times √4.
        let m = "transformer.h.1.mlp.c_fc"
        var direct: Tensor!
        LeastSquares.forEachInputRows(model: e.model, sequences: [e.tokenizer.encode(prompts[0])], modules: [m], batchSize: 1) { u, _ in direct = u[m]! }
        for i in 0..<direct.shape[1] { XCTAssertEqual(rows[m]!.data[i], 2 * direct.data[i], accuracy: 1e-5) }

        let with = EditState(moduleNames: e.config.modules)
        try e.apply([r], to: with)
        let plain = try makeEditor()
        let without = EditState(moduleNames: plain.config.modules)
        try plain.apply([r], to: without)
        let expected = LeastSquares.gram(rows[m]!, into: without.modules[m]!.gram!.copy())
        XCTAssertLessThan(with.modules[m]!.gram!.maxAbsDifference(expected), 1e-4 * expected.maxAbs())
        XCTAssertEqual(with.modules[m]!.cross!.maxAbsDifference(without.modules[m]!.cross!), 0, "contrast rows ask for no value")

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("contrast-\(getpid())")
        defer { try? FileManager.default.removeItem(at: dir) }
        try e.save(to: dir)
        let back = try DAFNetEditor.load(from: dir, model: e.model, tokenizer: e.tokenizer)
        XCTAssertEqual(back.subjects, e.subjects)
        try FileManager.default.removeItem(at: dir.appendingPathComponent(DAFNetEditor.subjectsFile))
        XCTAssertThrowsError(try DAFNetEditor.load(from: dir, model: e.model, tokenizer: e.tokenizer)) { error in
            XCTAssertTrue("\(error)".contains("contrast_subjects"), "\(error)")
        }
    }

    /// max |(λ·C + gram)·ΔW − cross|: how far ΔW is from solving the module's normal equations.
    func residual(_ e: DAFNetEditor, _ m: String, gram: Tensor, cross: Tensor, deltaWeight: Tensor) -> Float {
        let system = e.keyStatistics[m]! * e.lambda(m)
        system.add(gram)
        let n = system.shape[0], o = cross.shape[1]
        let lhs = Tensor(shape: [n, o])
        BLAS.gemm(lhs.data, system.data, deltaWeight.data, M: n, N: o, K: n)
        return lhs.maxAbsDifference(cross)
    }

    /// ΔW solves (λ·C + Σ uuᵀ)·ΔW = Σ u·vᵀ: the residual of the normal equations is float round-off
    /// (the solve runs in double; the tolerance is 1e-4 of the right-hand side's scale for float32 inputs).
    func testUpdateSolvesTheNormalEquations() throws {
        let e = try makeEditor()
        let state = EditState(moduleNames: e.config.modules)
        try e.apply(requests, to: state)
        for m in e.config.modules {
            let st = state.modules[m]!
            XCTAssertLessThan(residual(e, m, gram: st.gram!, cross: st.cross!, deltaWeight: st.deltaWeight!), 1e-4 * st.cross!.maxAbs(), m)
            XCTAssertGreaterThan(st.deltaWeight!.maxAbs(), 0, m)
            XCTAssertNil(st.deltaBias, m)
        }
    }

    /// The sums are order-independent and the network is causal: one call with three edits and three
    /// calls with one each give the same sums and the same ΔW; nothing of an earlier edit is decayed away.
    /// ΔW is compared by its backward error — the sequential ΔW solves the one call's normal equations to
    /// float round-off — since ΔW itself moves with the system's condition number (how much depends on
    /// the BLAS's summation order, so on its thread count).
    func testSequentialEqualsOneCallAndKeepsEveryEdit() throws {
        let e = try makeEditor()
        let one = EditState(moduleNames: e.config.modules)
        try e.apply(requests, to: one)
        let seq = EditState(moduleNames: e.config.modules)
        for r in requests { try e.apply([r], to: seq) }
        for m in e.config.modules {
            let a = one.modules[m]!, b = seq.modules[m]!
            XCTAssertLessThan(a.gram!.maxAbsDifference(b.gram!), 1e-4 * a.gram!.maxAbs(), m)
            XCTAssertLessThan(a.cross!.maxAbsDifference(b.cross!), 1e-4 * a.cross!.maxAbs(), m)
            XCTAssertLessThan(residual(e, m, gram: a.gram!, cross: a.cross!, deltaWeight: b.deltaWeight!), 1e-3 * a.cross!.maxAbs(), m)
            XCTAssertGreaterThan(b.deltaWeight!.maxAbs(), 0, m)
        }
    }

    /// An edit that supersedes an earlier one (the same fact, another target) takes the earlier edit's rows
    /// out of the sums: the gram is the one of the edits that remain, as if the earlier edit had never been
    /// made. Without fusion (MEND) a row's value does not depend on the past, so the cross sum and ΔW are
    /// those of the remaining edits too; with fusion the earlier edit's values are recomputed against the
    /// past as it is now, so its pull is taken out up to that difference.
    func testSupersedingTakesTheEarlierEditOutOfTheSums() throws {
        let old = requests[0], other = requests[1]
        var new = old
        new.targetNew = "French"
        for method in [EditorMethod.dafnet, .mend] {
            let e = try Self.editor(method: method)
            let replaced = EditState(moduleNames: e.config.modules), plain = EditState(moduleNames: e.config.modules)
            let reference = EditState(moduleNames: e.config.modules)
            try e.apply([old, other], to: replaced)
            try e.apply([new], to: replaced, superseding: [PriorEdit(old, ordinal: 0)])
            try e.apply([old, other], to: plain)
            try e.apply([new], to: plain)
            try e.apply([other, new], to: reference)
            for m in e.config.modules {
                let a = replaced.modules[m]!, r = reference.modules[m]!, p = plain.modules[m]!
                XCTAssertLessThan(a.gram!.maxAbsDifference(r.gram!), 1e-4 * r.gram!.maxAbs(), "\(method) \(m)")
                XCTAssertGreaterThan(p.gram!.maxAbsDifference(r.gram!), 1e-2 * r.gram!.maxAbs(), "\(method) \(m): without superseding the old rows stay")
                XCTAssertLessThan(residual(e, m, gram: a.gram!, cross: a.cross!, deltaWeight: a.deltaWeight!), 1e-4 * a.cross!.maxAbs(), "\(method) \(m)")
                if method == .mend {
                    XCTAssertLessThan(a.cross!.maxAbsDifference(r.cross!), 1e-4 * r.cross!.maxAbs(), m)
                    XCTAssertGreaterThan(p.cross!.maxAbsDifference(r.cross!), 1e-2 * r.cross!.maxAbs(), m)
                }
            }
            XCTAssertEqual(replaced.editCount, 3)
        }
    }

    /// `ls_lambda_scale` multiplies the learned λ: λ₀ = 2 at scale ¼ solves what λ₀ = ½ at scale 1 solves;
    /// a scale that is not positive is refused.
    func testLambdaScaleMultipliesTheLearnedLambda() throws {
        let scaled = try Self.editor(lambda: 2, lambdaScale: 0.25), plain = try Self.editor(lambda: 0.5)
        let m = "transformer.h.2.mlp.c_proj"
        XCTAssertEqual(scaled.lambda(m), plain.lambda(m), accuracy: 1e-6)
        let a = EditState(moduleNames: scaled.config.modules), b = EditState(moduleNames: plain.config.modules)
        try scaled.apply(requests, to: a)
        try plain.apply(requests, to: b)
        for m in scaled.config.modules {
            XCTAssertLessThan(a.modules[m]!.deltaWeight!.maxAbsDifference(b.modules[m]!.deltaWeight!), 1e-5 * b.modules[m]!.deltaWeight!.maxAbs(), m)
        }
        XCTAssertEqual(try JSONDecoder().decode(EditorConfig.self, from: Data(#"{"ls_lambda_scale": 0.25}"#.utf8)).lsLambdaScale, 0.25)
        for bad in ["0", "-1"] {
            XCTAssertThrowsError(try JSONDecoder().decode(EditorConfig.self, from: Data(#"{"ls_lambda_scale": \#(bad)}"#.utf8))) { error in
                XCTAssertTrue("\(error)".contains("ls_lambda_scale"), "\(error)")
            }
        }
    }

    /// A larger λ holds the module closer to its preserved outputs: the mean squared output change on
    /// preserved inputs, tr(ΔWᵀ·C·ΔW), falls as λ grows (the penalty of a ridge problem is non-increasing in
    /// its weight).
    func testLambdaTradesEditsForPreservation() throws {
        var penalties: [Double] = []
        for lambda: Float in [0.1, 10, 1000] {
            let e = try makeEditor(lambda: lambda)
            let state = EditState(moduleNames: e.config.modules)
            try e.apply(requests, to: state)
            let m = "transformer.h.2.mlp.c_proj"
            let dW = state.modules[m]!.deltaWeight!, c = e.keyStatistics[m]!
            let cd = Tensor(shape: dW.shape)
            BLAS.gemm(cd.data, c.data, dW.data, M: c.shape[0], N: dW.shape[1], K: c.shape[0])
            penalties.append(Double(BLAS.dot(dW.data, cd.data, count: dW.count)))
        }
        XCTAssertGreaterThan(penalties[0], penalties[1])
        XCTAssertGreaterThan(penalties[1], penalties[2])
    }

    /// The state (ΔW, the sums, the representations) survives `tensors()` and the editor folder its
    /// statistics and λ; a continued sequence after the round trip is the uninterrupted one.
    /// The grams are exactly symmetric, so a stored state keeps their upper triangle and restores them bit for
    /// bit; a gram that is not symmetric (a state made before) is stored whole; a bad length is an error.
    func testGramsAreStoredAsTheirUpperTriangle() throws {
        let e = try makeEditor()
        let state = EditState(moduleNames: e.config.modules)
        try e.apply([requests[0], requests[1]], to: state)
        let tensors = state.tensors()
        for m in e.config.modules {
            let g = state.modules[m]!.gram!, n = g.shape[0]
            for i in 0..<n { for j in 0..<i { XCTAssertEqual(g[i, j], g[j, i]) } }
            XCTAssertEqual(tensors["gram." + m]!.shape, [n * (n + 1) / 2], m)
        }
        let restored = try EditState(moduleNames: e.config.modules, tensors: tensors)
        for m in e.config.modules { XCTAssertEqual(restored.modules[m]!.gram!.array, state.modules[m]!.gram!.array, m) }
        let m0 = e.config.modules[0]
        let skew = state.modules[m0]!.gram!.copy()
        skew[1, 0] += 1
        state.modules[m0]!.gram = skew
        XCTAssertEqual(state.tensors()["gram." + m0]!.array, skew.array, "stored whole")
        var bad = tensors
        bad["gram." + m0] = Tensor(shape: [4])
        XCTAssertThrowsError(try EditState(moduleNames: e.config.modules, tensors: bad))
    }

    func testStateAndEditorRoundTrip() throws {
        let e = try makeEditor()
        let state = EditState(moduleNames: e.config.modules)
        try e.apply([requests[0]], to: state)
        let restored = try EditState(moduleNames: e.config.modules, tensors: state.tensors())
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ls-editor-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try e.save(to: dir)
        let loaded = try DAFNetEditor.load(from: dir, model: e.model, tokenizer: e.tokenizer)
        XCTAssertEqual(loaded.config.accumulation, .leastSquares)
        try e.apply([requests[1]], to: state)
        try loaded.apply([requests[1]], to: restored)
        for m in e.config.modules {
            XCTAssertEqual(state.modules[m]!.deltaWeight!.array, restored.modules[m]!.deltaWeight!.array, m)
            XCTAssertEqual(loaded.lambda(m), e.lambda(m))
        }
    }

    /// An editor without key statistics refuses to edit by least squares, with a message that says so.
    func testMissingStatisticsIsAnError() throws {
        let e = try makeEditor()
        let bare = try DAFNetEditor(config: e.config, model: e.model, tokenizer: e.tokenizer)
        XCTAssertThrowsError(try bare.apply([requests[0]], to: EditState(moduleNames: e.config.modules))) { error in
            XCTAssertTrue("\(error)".contains("key statistics"), "\(error)")
        }
    }

    /// A warm start carries the learned λ and edit rates with the networks (continuing a trained editor
    /// must not reset what it learned).
    func testWarmStartCopiesLambdaAndRates() throws {
        let e = try makeEditor()
        for (i, m) in e.config.modules.enumerated() {
            e.logLambdas[m]!.value[0] = Float(i) * 0.3
            e.editLRs[m]!.value[0] = -0.01 * Float(i + 1)
        }
        let other = try DAFNetEditor(config: e.config, model: e.model, tokenizer: e.tokenizer)
        other.initialise(seed: 99)
        try other.warmStart(from: e)
        for m in e.config.modules {
            XCTAssertEqual(other.lambda(m), e.lambda(m), m)
            XCTAssertEqual(other.editLRs[m]!.value[0], e.editLRs[m]!.value[0], m)
        }
    }

    /// An editor of a subset of the module shapes warm-starts from the networks of those shapes, its
    /// modules taking the rates and λ of the other's modules of the same shape in order; a shape the other
    /// lacks is refused.
    func testWarmStartOfASubsetOfTheShapes() throws {
        let e = try makeEditor()
        for (i, m) in e.config.modules.enumerated() { e.logLambdas[m]!.value[0] = Float(i) * 0.3 + 0.1 }
        var cfg = e.config
        cfg.modules = e.config.modules.filter { e.routing[$0]!.key == "256x64" }
        XCTAssertFalse(cfg.modules.isEmpty)
        let subset = try DAFNetEditor(config: cfg, model: e.model, tokenizer: e.tokenizer)
        subset.initialise(seed: 99)
        try subset.warmStart(from: e)
        XCTAssertEqual(Set(subset.networks.keys), ["256x64"])
        for (p, q) in zip(subset.networks["256x64"]!.parameters, e.networks["256x64"]!.parameters) {
            XCTAssertEqual(p.value.maxAbsDifference(q.value), 0, p.name)
        }
        for m in cfg.modules { XCTAssertEqual(subset.lambda(m), e.lambda(m), m) }
        XCTAssertThrowsError(try e.warmStart(from: subset))
    }

    /// The meta-gradient through the solve — into the network, the edit rate and log λ — against finite
    /// differences of the episode loss.
    /// With contrast rows in the solve (constants of the episode) the meta-gradient still matches finite
    /// differences, and the cached rows are the editor's own.
    func testMetaGradientWithContrastMatchesFiniteDifferences() throws {
        let e = try makeEditor(seed: 5)
        var cfg = e.config
        cfg.training.reliaLambda = 1; cfg.training.genLambda = 1; cfg.training.locLambda = 1
        cfg.contrastSubjects = 2; cfg.contrastWeight = 0.5
        let editor = try DAFNetEditor(config: cfg, model: e.model, tokenizer: e.tokenizer)
        try editor.warmStart(from: e)
        try editor.setKeyStatistics(e.keyStatistics)
        editor.subjects = ["Danielle Darrieux", "Toko Yasuda", "Autonomous University of Madrid", "Marie Curie"]
        let subjects = ["Danielle Darrieux", "Toko Yasuda", "Autonomous University of Madrid"]
        let withSubjects = zip(requests, subjects).map { r, s -> EditRequest in var r = r; r.subject = s; return r }
        let trainer = try MetaTrainer(editor: editor, pool: withSubjects, runDir: FileManager.default.temporaryDirectory)
        let cached = trainer.contrastRows(poolIndices: [2, 0], requests: [withSubjects[2], withSubjects[0]])
        let fresh = editor.contrastRows([withSubjects[2], withSubjects[0]])
        for m in cfg.modules { XCTAssertLessThan(cached[m]!.maxAbsDifference(fresh[m]!), 1e-5 * fresh[m]!.maxAbs(), m) }
        let net = editor.networks["64x256"]!
        try checkMetaGradient(trainer, withSubjects, parameters: [
            net.parameter("dafnet_model.layers.1.feedforward.fc2.weight")!,
            editor.editLRs["transformer.h.2.mlp.c_proj"]!,
            editor.logLambdas["transformer.h.2.mlp.c_fc"]!])
    }

    func testMetaGradientMatchesFiniteDifferences() throws {
        let e = try makeEditor(seed: 5)
        var cfg = e.config
        cfg.training.reliaLambda = 1; cfg.training.genLambda = 1; cfg.training.locLambda = 1
        let editor = try DAFNetEditor(config: cfg, model: e.model, tokenizer: e.tokenizer)
        try editor.warmStart(from: e)
        try editor.setKeyStatistics(e.keyStatistics)
        let trainer = try MetaTrainer(editor: editor, pool: requests, runDir: FileManager.default.temporaryDirectory)
        let net = editor.networks["64x256"]!
        try checkMetaGradient(trainer, requests, parameters: [
            net.parameter("dafnet_model.layers.0.inner_att.trans1.0.weight")!,
            net.parameter("dafnet_model.layers.1.feedforward.fc2.weight")!,
            net.parameter("dafnet_model.layers.1.mode_scale.weight")!,
            editor.editLRs["transformer.h.2.mlp.c_proj"]!,
            editor.logLambdas["transformer.h.2.mlp.c_fc"]!])
    }
}
