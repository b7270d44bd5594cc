import Editing
import Foundation
import LanguageModel
import Logging
import Storage
import XCTest
@testable import Pipeline

/// Real parts in temporary folders: the tiny GPT-2 fixture, a small random editor saved to disk, a real
/// checkpoint store and inbox.
enum Fixture {
    static let modelFolder = Bundle.module.resourceURL!.appendingPathComponent("Fixtures/gpt2-tiny")
    static let modules = ["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"]

    static func editorConfig() -> EditorConfig {
        var cfg = EditorConfig()
        cfg.modules = modules
        cfg.auxModel.layerN = 1; cfg.auxModel.innerAttDim = 8; cfg.auxModel.ffnDim = 12; cfg.auxModel.outerAttDim = 6
        cfg.auxModel.outerScoreAttDim = 4
        cfg.initEditLR = 0.01
        return cfg
    }

    /// Writes a random editor (fixed seed) to `folder`.
    static func writeEditor(to folder: URL, seed: UInt64 = 3) throws {
        let f = try ModelFolder.load(modelFolder, requireTokenizer: true)
        let e = try DAFNetEditor(config: editorConfig(), model: f.model, tokenizer: f.tokenizer!)
        e.initialise(seed: seed)
        try e.save(to: folder)
    }

    /// Writes a random `least_squares` editor (fixed seed) with key statistics from the fixture's own texts,
    /// routed when `routeThreshold` is given.
    static func writeLeastSquaresEditor(to folder: URL, seed: UInt64 = 3, routeThreshold: Float? = nil, shardEdits: Int? = nil) throws {
        let f = try ModelFolder.load(modelFolder, requireTokenizer: true)
        var cfg = editorConfig()
        cfg.routeThreshold = routeThreshold
        cfg.lsShardEdits = shardEdits
        cfg.accumulation = .leastSquares
        cfg.editBias = false
        cfg.initEditLR = 0.5
        let e = try DAFNetEditor(config: cfg, model: f.model, tokenizer: f.tokenizer!)
        e.initialise(seed: seed)
        let texts = (0..<80).map { k -> String in let r = request(k); return r.prompt + " " + objects[k % objects.count] + "." } + heldout
        try e.setKeyStatistics(LeastSquares.keyStatistics(model: f.model, tokenizer: f.tokenizer!, modules: modules, texts: texts).stats)
        try e.save(to: folder)
    }

    /// Writes an AlphaEdit editor (no training) with key statistics from the fixture's own texts.
    static func writeAlphaEditEditor(to folder: URL) throws {
        let f = try ModelFolder.load(modelFolder, requireTokenizer: true)
        var c = MEMITConfig()
        c.clampNormFactor = 4; c.valueSteps = 8; c.l2 = 1e-3; c.nullspaceThreshold = 0.05
        let texts = (0..<80).map { k -> String in let r = request(k); return r.prompt + " " + objects[k % objects.count] + "." } + heldout
        try MEMITEditor.create(method: .alphaedit, model: f.model, tokenizer: f.tokenizer!, modules: ["transformer.h.1.mlp.c_proj"],
                               texts: texts, settings: c).save(to: folder)
    }

    static let subjects = ["Danielle Darrieux", "Toko Yasuda", "Autonomous University of Madrid", "Apple A5", "Ferrari",
                           "Lyon", "Thomas Joannes Stieltjes", "Honda Civic", "Anaal Nathrakh", "Pierre Curie", "Gazeta",
                           "Kamal Haasan", "Nissan Skyline", "Ivan Bunin", "Lake Ontario", "Hans Zimmer"]
    static let relations = ["The mother tongue of %@ is", "%@ was born in", "%@ is a citizen of", "%@ works in the field of",
                            "The headquarters of %@ is in"]
    static let objects = ["English", "French", "Sweden", "piano", "Paris", "Tokyo", "Rome", "physics", "jazz", "Berlin"]

    /// The k-th synthetic edit (deterministic).
    static func request(_ k: Int) -> EditRequest {
        let s = subjects[k % subjects.count]
        let r = relations[(k / subjects.count) % relations.count]
        let o = objects[(k * 7 + 3) % objects.count]
        let other = subjects[(k + 5) % subjects.count]
        return EditRequest(prompt: r.replacingOccurrences(of: "%@", with: s), targetNew: o, subject: s,
                           rephrases: ["In short, " + r.replacingOccurrences(of: "%@", with: s)],
                           locality: [.init(prompt: r.replacingOccurrences(of: "%@", with: other), groundTruth: objects[k % objects.count])],
                           caseId: String(k))
    }

    static func batch(_ range: Range<Int>) throws -> Data { try EditBatch.encode(range.map(request)) }

    static let heldout = ["The city of Paris is in France.", "Rome is the capital of Italy.", "Water boils at one hundred degrees.",
                          "Pierre Curie was a physicist."]
    static let canaries: [EditRequest.LocalityPair] = [
        .init(prompt: "The capital of France is", groundTruth: "Paris"),
        .init(prompt: "Ivan Bunin was born in", groundTruth: "Russia"),
        .init(prompt: "Hans Zimmer writes", groundTruth: "music"),
    ]
}

/// A temporary folder removed at deinit.
final class TempDir {
    let url: URL
    init(_ name: String = "pipeline") {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-\(UUID().uuidString.prefix(8))")
        try! FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(at: url) }
    func path(_ p: String) -> URL { url.appendingPathComponent(p) }
}

/// One pipeline over a temporary inbox and store (the model and editor loaded once per harness).
final class Harness {
    let tmp: TempDir
    let editorFolder: URL
    let folder: ModelFolder
    let editor: SequentialEditor
    let inbox: Inbox
    var store: CheckpointStore
    let processor: BatchProcessor
    var inboxURL: URL { tmp.path("inbox") }
    var storeURL: URL { tmp.path("store") }

    init(guardSettings: CollapseGuard = .disabled, canaries: [EditRequest.LocalityPair] = Fixture.canaries,
         editorFolder existing: URL? = nil, name: String = "pipeline", keyframeEdits: Int? = nil) throws {
        tmp = TempDir(name)
        editorFolder = existing ?? tmp.path("editor")
        if existing == nil { try Fixture.writeEditor(to: editorFolder) }
        folder = try ModelFolder.load(Fixture.modelFolder, requireTokenizer: true)
        editor = try EditorRegistry.load(from: editorFolder, model: folder.model, tokenizer: folder.tokenizer!)
        inbox = try Inbox(tmp.path("inbox"))
        store = try CheckpointStore(at: tmp.path("store"), create: true)
        var settings = PipelineSettings()
        settings.minimumFileAge = 0
        settings.collapseGuard = guardSettings
        settings.retentionSample = 8
        settings.answerTokens = 2
        if let keyframeEdits { settings.keyframeEdits = keyframeEdits }
        let tok = folder.tokenizer!
        let hashes = PipelineResources.hashes(modelFolder: Fixture.modelFolder, editorFolder: editorFolder)
        let resources = PipelineResources(heldoutText: Fixture.heldout.map { tok.encode($0) }, canaries: canaries,
                                          canaryNote: canaries.isEmpty ? "no canary file" : nil,
                                          baseModelSHA256: hashes.model, editorSHA256: hashes.editor)
        var logger = Logger(label: "test.pipeline") { StructuredLogHandler(label: $0, level: .critical) }
        logger.logLevel = .critical
        processor = try BatchProcessor(inbox: inbox, store: store, editor: editor, resources: resources, settings: settings, logger: logger)
    }

    /// Writes a batch into the inbox the way producers should: a dot-file renamed in.
    func drop(_ name: String, _ data: Data) throws {
        let tmpFile = inboxURL.appendingPathComponent(".\(name).tmp")
        try data.write(to: tmpFile)
        try FileManager.default.moveItem(at: tmpFile, to: inboxURL.appendingPathComponent(name))
    }

    func names(_ sub: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: inboxURL.appendingPathComponent(sub).path)) ?? []).sorted()
    }

    func inboxNames() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: inboxURL.path)) ?? [])
            .filter { !["processing", "done", "failed"].contains($0) }.sorted()
    }

    func headState() throws -> String? {
        guard let h = try store.head() else { return nil }
        return try store.manifest(h).stateSHA256
    }
}
