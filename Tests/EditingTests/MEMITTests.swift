import XCTest
import LanguageModel
import TensorCore
@testable import Editing

/// MEMIT and AlphaEdit: the closed-form update, the null-space projection, determinism and state
/// persistence, both model families without training, and the editor registry.
final class MEMITTests: XCTestCase {
    static let gpt2 = Bundle.module.resourceURL!.appendingPathComponent("Fixtures/gpt2-tiny")
    static let llama = Bundle.module.resourceURL!.appendingPathComponent("Fixtures/llama-tiny")

    let requests = [
        EditRequest(prompt: "The mother tongue of Danielle Darrieux is", targetNew: "English", subject: "Danielle Darrieux"),
        EditRequest(prompt: "Toko Yasuda plays the", targetNew: "piano", subject: "Toko Yasuda"),
        EditRequest(prompt: "Autonomous University of Madrid is in", targetNew: "Sweden", subject: "Autonomous University of Madrid"),
        EditRequest(prompt: "The headquarters of Ferrari is in", targetNew: "Tokyo"),
    ]

    var preserved: [String] { TestTexts.preserved }

    /// Settings for the random tiny models: a loose clamp so the value search can move them at all, and
    /// the ridge weights scaled to their small activations.
    func settings() -> MEMITConfig {
        var c = MEMITConfig()
        c.clampNormFactor = 4; c.valueSteps = 10; c.covarianceWeight = 1; c.l2 = 1e-3; c.nullspaceThreshold = 0.05
        return c
    }

    func make(_ method: EditorMethod, folder url: URL = gpt2, modules: [String]? = nil) throws -> (MEMITEditor, ModelFolder) {
        let f = try ModelFolder.load(url, requireTokenizer: true)
        let e = try MEMITEditor.create(method: method, model: f.model, tokenizer: f.tokenizer!, modules: modules, texts: preserved,
                                       settings: settings())
        return (e, f)
    }

    /// Solves A·X = B (A n × n, B n × m, row-major, double) by Gaussian elimination with partial pivoting:
    /// an independent check of the Cholesky path.
    func gaussSolve(_ a: [Double], _ b: [Double], n: Int, m: Int) -> [Double] {
        var a = a, b = b
        for c in 0..<n {
            let p = (c..<n).max { abs(a[$0 * n + c]) < abs(a[$1 * n + c]) }!
            if p != c {
                for j in 0..<n { a.swapAt(c * n + j, p * n + j) }
                for j in 0..<m { b.swapAt(c * m + j, p * m + j) }
            }
            for r in (c + 1)..<n {
                let f = a[r * n + c] / a[c * n + c]
                if f == 0 { continue }
                for j in c..<n { a[r * n + j] -= f * a[c * n + j] }
                for j in 0..<m { b[r * m + j] -= f * b[c * m + j] }
            }
        }
        var x = [Double](repeating: 0, count: n * m)
        for r in stride(from: n - 1, through: 0, by: -1) {
            for j in 0..<m {
                var s = b[r * m + j]
                for k in (r + 1)..<n { s -= a[r * n + k] * x[k * m + j] }
                x[r * m + j] = s / a[r * n + r]
            }
        }
        return x
    }

    /// MEMIT with one edited module: the state's ΔW is the least-squares update for the measured keys K and
    /// residuals R, the solution of (λ·C + KᵀK + ridge)·ΔW = KᵀR found here by Gaussian elimination
    /// (the ridge: 1e-4 of the system's mean diagonal, as `LeastSquares.factor` adds). Tolerance 1e-3 of the
    /// largest entry: the two solvers' float32 inputs agree exactly, their double-precision round-off differs,
    /// and the system's condition number (λ = 1 on small activations) is about 1e4.
    func testMEMITUpdateIsTheDirectLeastSquaresSolution() throws {
        let m = "transformer.h.1.mlp.c_proj"
        let (e, _) = try make(.memit, modules: [m])
        let lookups = requests.map { r in e.config.prefixes.map { e.lookup(r, prefix: $0) } }
        let kl: [MEMITEditor.Lookup?] = requests.map { _ in nil }
        e.model.clearEdits()
        // What apply measures on the unedited model: target values, keys, the current values.
        var cfg = e.config
        cfg.klFactor = 0
        let e0 = try MEMITEditor(config: cfg, model: e.model, tokenizer: e.tokenizer, keyStatistics: e.keyStatistics)
        let z = try e0.searchValues(lookups: lookups, kl: kl)
        let (keys, current) = e0.keysAndValues(lookups: lookups, modules: [m])
        let K = keys[m]!, R = z.copy()
        R.add(current, alpha: -1)
        let n = K.shape[1], o = R.shape[1]
        let C = e.keyStatistics[m]!
        let G = LeastSquares.gram(K), KR = LeastSquares.cross(K, R)
        var a = (0..<(n * n)).map { Double(cfg.covarianceWeight) * Double(C.data[$0]) + Double(G.data[$0]) }
        let ridge = (0..<n).reduce(0.0) { $0 + a[$1 * n + $1] } / Double(n) * 1e-4
        for i in 0..<n { a[i * n + i] += ridge }
        let direct = gaussSolve(a, (0..<(n * o)).map { Double(KR.data[$0]) }, n: n, m: o)

        // The same edits through apply, with the KL term off (it only shapes z, which we measured without it).
        let state = e0.newState()
        try e0.apply(requests, to: state)
        let dW = state.delta(m).weight!
        let scale = direct.map(abs).max()!
        XCTAssertGreaterThan(scale, 0)
        var worst = 0.0
        for i in 0..<(n * o) { worst = max(worst, abs(Double(dW.data[i]) - direct[i])) }
        XCTAssertLessThan(worst, 1e-3 * scale, "ΔW differs from the direct solve by \(worst) (largest entry \(scale))")
    }

    /// MEMIT with `joint_solve`: after edits in two calls, ΔW solves the normal equations over both calls'
    /// keys and values kept in the state, (λ·C + Σ kkᵀ + ridge)·ΔW = Σ k·r₀ᵀ (residual within 1e-4 of the right
    /// side's largest entry: a double-precision solve rounded to float32), and the state round-trips.
    func testMEMITJointSolveSolvesOverEveryEdit() throws {
        let m = "transformer.h.1.mlp.c_proj"
        var cfg = settings()
        cfg.jointSolve = true
        let f = try ModelFolder.load(Self.gpt2, requireTokenizer: true)
        let e = try MEMITEditor.create(method: .memit, model: f.model, tokenizer: f.tokenizer!, modules: [m], texts: preserved, settings: cfg)
        let state = e.newState()
        try e.apply([requests[0]], to: state)
        try e.apply([requests[1], requests[2]], to: state)
        let t = state.tensors()
        let G = t["edit_keys." + m]!, X = t["edit_values." + m]!, dW = t["delta_weight." + m]!
        let n = G.shape[0], o = X.shape[1]
        let C = e.keyStatistics[m]!
        var a = (0..<(n * n)).map { Double(cfg.covarianceWeight) * Double(C.data[$0]) + Double(G.data[$0]) }
        let ridge = (0..<n).reduce(0.0) { $0 + a[$1 * n + $1] } / Double(n) * 1e-4
        for i in 0..<n { a[i * n + i] += ridge }
        var worst = 0.0, scale = 0.0
        for i in 0..<n {
            for j in 0..<o {
                var lhs = 0.0
                for k in 0..<n { lhs += a[i * n + k] * Double(dW.data[k * o + j]) }
                worst = max(worst, abs(lhs - Double(X.data[i * o + j]))); scale = max(scale, abs(Double(X.data[i * o + j])))
            }
        }
        XCTAssertGreaterThan(scale, 0)
        XCTAssertLessThan(worst, 1e-4 * scale)
        let restored = try e.restoreState(t)
        for (k, v) in t { XCTAssertEqual(v.maxAbsDifference(restored.tensors()[k]!), 0, k) }
        XCTAssertEqual(restored.editCount, 3)
    }

    /// AlphaEdit's update lies in the null space of the preserved keys: every eigenvector of C outside it
    /// (the directions preserved text uses) is mapped to exactly the old output, to float round-off
    /// (1e-5 of the update's norm: U is orthonormal to those vectors in double precision, then rounded).
    func testAlphaEditLeavesPreservedKeysUnchanged() throws {
        let (e, _) = try make(.alphaedit)
        let state = e.newState()
        try e.apply(requests, to: state)
        for m in e.config.modules {
            let C = e.keyStatistics[m]!, n = C.shape[0]
            let (values, vectors) = try LinearAlgebra.symmetricEigen((0..<(n * n)).map { Double(C.data[$0]) }, n: n)
            XCTAssertEqual(values, values.sorted())
            let k = e.nullSpaces[m]!.shape[1]  // the null space: the k smallest eigenvalues' directions
            XCTAssertGreaterThan(k, 0)
            let dW = state.delta(m).weight!, o = dW.shape[1]
            let norm = sqrt((0..<dW.count).reduce(0.0) { $0 + Double(dW.data[$1]) * Double(dW.data[$1]) })
            XCTAssertGreaterThan(norm, 0, "\(m): no update")
            var kept = 0
            for c in k..<n {
                kept += 1
                for j in 0..<o {
                    var s = 0.0
                    for i in 0..<n { s += vectors[i * n + c] * Double(dW.data[i * o + j]) }
                    XCTAssertLessThan(abs(s), 1e-5 * norm, "\(m): preserved key \(c) moved")
                }
            }
            XCTAssertEqual(kept, n - k)
            // The null space: exactly the eigenvalues below the threshold's fraction of the largest.
            XCTAssertEqual(k, values.filter { $0 < Double(e.config.nullspaceThreshold) * values.last! }.count)
        }
    }

    /// The same AlphaEdit sequence twice gives bit-identical states; a state saved after two edits and
    /// restored into an editor loaded from its saved folder continues to the same state as the original.
    func testAlphaEditSequenceIsDeterministicAndSurvivesSaveAndLoad() throws {
        let (e, f) = try make(.alphaedit)
        func run(_ editor: MEMITEditor) throws -> EditorState {
            let s = editor.newState()
            for r in requests.prefix(2) { try editor.apply([r], to: s) }
            return s
        }
        let a = try run(e), b = try run(e)
        XCTAssertEqual(a.tensors().keys.sorted(), b.tensors().keys.sorted())
        for (k, t) in a.tensors() { XCTAssertEqual(t.maxAbsDifference(b.tensors()[k]!), 0, k) }
        XCTAssertNotNil(a.tensors()["edit_keys.transformer.h.1.mlp.c_proj"])

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("memit-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try e.save(to: dir)
        let loaded = try EditorRegistry.load(from: dir, model: f.model, tokenizer: f.tokenizer!)
        XCTAssertEqual(loaded.method, .alphaedit)
        let restored = try loaded.restoreState(a.tensors())
        XCTAssertEqual(restored.editCount, 2)
        try e.apply(Array(requests[2...]), to: a)
        try loaded.apply(Array(requests[2...]), to: restored)
        for (k, t) in a.tensors() { XCTAssertEqual(t.maxAbsDifference(restored.tensors()[k]!), 0, k) }
    }

    /// A GPT-2 and a Llama fixture, each edited by MEMIT and AlphaEdit straight after `create`: the target's
    /// negative log-likelihood falls for every edit, at least by half (ln 2). The edits are written at the
    /// prompt's last token (no subject): in these random tiny models a shift at the subject's token barely
    /// reaches the answer through their untrained attention, which says nothing about the editor.
    func testGPT2AndLlamaAreEditedWithoutTraining() throws {
        let requests = self.requests.map { r -> EditRequest in var r = r; r.subject = nil; return r }
        for url in [Self.gpt2, Self.llama] {
            for method in [EditorMethod.memit, .alphaedit] {
                let (e, f) = try make(method, folder: url)
                let items = requests.map { e.scored($0.prompt, $0.targetNew) }
                f.model.clearEdits()
                let before = f.model.predict(items)
                let state = e.newState()
                try e.apply(requests, to: state)
                let after = f.model.predict(items)
                for (i, (x, y)) in zip(before, after).enumerated() {
                    XCTAssertLessThan(y.nll, x.nll - log(2.0), "\(url.lastPathComponent) \(method) edit \(i): nll \(x.nll) → \(y.nll)")
                }
                XCTAssertEqual(state.editCount, requests.count)
            }
        }
    }

    /// The registry picks the implementation from `editor.json`; an editor made for another model names that
    /// model and lists this model's linear modules; a state of another method is refused.
    func testRegistryAndForeignEditorsAndStates() throws {
        let (e, f) = try make(.memit)
        var cfg = e.config
        cfg.baseModel = "gpt2-tiny"
        let named = try MEMITEditor(config: cfg, model: f.model, tokenizer: f.tokenizer!, keyStatistics: e.keyStatistics)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("memit-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try named.save(to: dir)
        XCTAssertEqual(try EditorRegistry.header(of: dir).method, .memit)
        XCTAssertTrue(try EditorRegistry.load(from: dir, model: f.model, tokenizer: f.tokenizer!) is MEMITEditor)

        let llama = try ModelFolder.load(Self.llama, requireTokenizer: true)
        XCTAssertThrowsError(try EditorRegistry.load(from: dir, model: llama.model, tokenizer: llama.tokenizer!)) { error in
            guard case let EditingError.editorDoesNotFit(_, madeFor, module, linears) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(madeFor, "gpt2-tiny")
            XCTAssertEqual(module, cfg.modules[0])
            XCTAssertTrue(linears.contains("model.layers.0.mlp.down_proj"))
            XCTAssertTrue("\(error)".contains("dafnet editor create"))
        }
        // A DAFNet state (past representations) handed to MEMIT, and a MEMIT state handed to FT.
        let dafnetState = EditState(moduleNames: cfg.modules)
        XCTAssertThrowsError(try e.apply([requests[0]], to: dafnetState)) { error in
            guard case EditingError.foreignState(.memit, _) = error else { return XCTFail("\(error)") }
        }
        var ft = FineTuneConfig()
        ft.modules = cfg.modules
        let fte = try FineTuneEditor(config: ft, model: f.model, tokenizer: f.tokenizer!)
        XCTAssertThrowsError(try fte.apply([requests[0]], to: e.newState()))
        XCTAssertThrowsError(try e.restoreState(["reps.\(cfg.modules[0]).0": Tensor(shape: [1, 4])]))
        // An unknown method in editor.json is named.
        try Data(#"{"method": "rome", "modules": []}"#.utf8).write(to: dir.appendingPathComponent("editor.json"))
        XCTAssertThrowsError(try EditorRegistry.header(of: dir)) { error in
            XCTAssertTrue("\(error)".contains("alphaedit"), "\(error)")
        }
    }
}
