import ArgumentParser
import Editing
import Foundation
import LanguageModel
import Pipeline

/// `dafnet editor …`: editor folders.
struct EditorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "editor", abstract: "Make editor folders.", subcommands: [EditorCreate.self])
}

/// `dafnet editor create --method memit|alphaedit|ft --model DIR --out DIR`: an editor for any GPT-2 or Llama
/// folder without training (DAFNet and MEND editors come from `train-editor`).
struct EditorCreate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Write an editor folder that needs no training: memit or alphaedit (key statistics over a text), or ft.")

    @Option(help: "memit, alphaedit or ft.")
    var method: String
    @OptionGroup var model: ModelOption
    @Option(help: "Text for the key statistics, one text per line. Default: the true facts of samples/dafset/train.jsonl (the sample world's meta-training material; no evaluation fact), fine for the sample model; give ordinary text of your model's domain for your own.")
    var text: String?
    @Option(help: "At most this many lines of --text.")
    var maxTexts = 100_000
    @Option(help: "Blocks whose MLP output projection is edited, comma-separated (default: the early-middle blocks, MEMIT's share of the depth; printed).")
    var layers: String?
    @Option(help: "A JSON file of settings to override (editor.json keys, e.g. {\"covariance_weight\": 5000}).")
    var settings: String?
    @Option(help: "The editor folder to write.")
    var out: String

    func run() throws {
        guard let m = EditorMethod(rawValue: method), [.memit, .alphaedit, .ft].contains(m) else {
            throw ValidationError("--method memit, alphaedit or ft (dafnet and mend editors are meta-trained: dafnet train-editor)")
        }
        let folder = try model.load(requireTokenizer: true)
        let spec = folder.model.spec
        var modules: [String]?
        if let layers {
            let ls = layers.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            guard !ls.isEmpty, ls.allSatisfy({ (0..<spec.layers).contains($0) }) else {
                throw ValidationError("--layers: block numbers in 0..<\(spec.layers)")
            }
            modules = ls.sorted().map { spec.names.layerPrefix($0) + "." + spec.names.mlpOut }
        }
        let outURL = URL(fileURLWithPath: out)
        let hashes = PipelineResources.hashes(modelFolder: model.url, editorFolder: nil)
        if m == .ft {
            var c = FineTuneConfig()
            c.modules = modules ?? EditorConfig.defaultModules(for: spec)
            let editor = try runMapped { try FineTuneEditor(config: c, model: folder.model, tokenizer: folder.tokenizer!) }
            try runMapped { try editor.save(to: outURL) }
            print("wrote \(out): ft on \(c.modules.joined(separator: ", "))")
            return
        }
        var cfg = MEMITConfig()
        if let settings {
            // editor.json keys; a missing one keeps its default, an unknown one is an error.
            cfg = try runMapped { try EditorRegistry.readConfig(MEMITConfig.self, file: URL(fileURLWithPath: settings)) }
        }
        cfg.baseModel = model.model == nil ? "samples/model" : model.url.standardizedFileURL.lastPathComponent
        cfg.baseModelSHA256 = hashes.model
        let texts: [String]
        if let text {
            texts = Array(try textLines(text).prefix(maxTexts))
            cfg.statisticsText = URL(fileURLWithPath: text).lastPathComponent
        } else {
            let train = Embedded.samples().appendingPathComponent("dafset/train.jsonl")
            texts = Array(LeastSquares.preservedTexts(try runMapped { try EditBatch.read(train) }).prefix(maxTexts))
            cfg.statisticsText = "samples/dafset/train.jsonl (true facts)"
            if model.model != nil { printError("note: no --text: key statistics from the sample world's facts; ordinary text of your model's domain is better") }
        }
        let t0 = Date()
        var shown = Date.distantPast
        let editor = try runMapped {
            try MEMITEditor.create(method: m, model: folder.model, tokenizer: folder.tokenizer!, modules: modules, texts: texts,
                                   settings: cfg) { done, total in
                guard done == total || Date().timeIntervalSince(shown) > 1 else { return }
                shown = Date()
                let el = Date().timeIntervalSince(t0)
                let eta = done > 0 ? el / Double(done) * Double(total - done) : 0
                printProgress(String(format: "key statistics: %d/%d texts  eta %.0f s", done, total, eta))
            }
        }
        printError("")
        try runMapped { try editor.save(to: outURL) }
        print("wrote \(out): \(m.rawValue) on \(editor.config.modules.joined(separator: ", "))")
        print("key statistics: \(editor.config.statisticsTokens) tokens of \(texts.count) texts (\(cfg.statisticsText ?? ""))")
        for (mod, u) in editor.nullSpaces.sorted(by: { $0.key < $1.key }) {
            let energy = editor.nullSpaceEnergy(mod)
            print(String(format: "null space of %@: %d of %d dimensions (eigenvalues below %g of the largest; %.1f %% of the preserved keys' energy)",
                         mod, u.shape[1], u.shape[0], editor.config.nullspaceThreshold, energy * 100))
        }
        print("context prefixes: \(editor.config.prefixes.dropFirst().map { "\"\($0)\"" }.joined(separator: ", "))")
    }
}
