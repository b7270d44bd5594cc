import ArgumentParser
import Editing
import Foundation
import LanguageModel
import Pipeline
import Storage
import TensorCore
import Tokenizers

/// The embedded default: resources shipped in `samples/` beside the executable's package.
enum Embedded {
    /// The embedded samples: `$DAFNET_SAMPLES` when set, else the `samples/` folder of the package the
    /// executable was built in (found by walking up from it), else `samples/` in the current folder. Every
    /// input default (model, editors, edits, configurations, text) resolves here; a `samples/` folder in the
    /// current folder does not take over. Outputs default to the current folder, never into `samples/`.
    static func samples() -> URL {
        if let env = ProcessInfo.processInfo.environment["DAFNET_SAMPLES"], !env.isEmpty { return URL(fileURLWithPath: env) }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<5 {
            let candidate = dir.appendingPathComponent("samples")
            if FileManager.default.fileExists(atPath: candidate.appendingPathComponent("model").path) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return URL(fileURLWithPath: FileManager.default.currentDirectoryPath).appendingPathComponent("samples")
    }

    static var model: URL { samples().appendingPathComponent("model") }
}

/// `--model DIR` (default: the embedded sample model).
struct ModelOption: ParsableArguments {
    @Option(name: .long, help: "A Hugging Face model folder (config.json, model.safetensors, tokenizer.json). Default: samples/model.")
    var model: String?

    var url: URL { model.map { URL(fileURLWithPath: $0) } ?? Embedded.model }

    func load(requireTokenizer: Bool = false) throws -> ModelFolder {
        try runMapped { try ModelFolder.load(url, requireTokenizer: requireTokenizer) }
    }
}

/// JSON printing shared by the commands.
func printJSON<T: Encodable>(_ value: T) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    print(String(decoding: try enc.encode(value), as: UTF8.self))
}

/// `--store S [--version V]`: ask a stored version's edited model instead of the bare one (the version's
/// ΔW/Δb installed on the model folder it was made on).
struct StoredVersionOptions: ParsableArguments {
    @Option(help: "A checkpoint store: answer with one of its versions' edits installed (default: the unedited model).")
    var store: String?
    @Option(help: "With --store: the version (a number, HEAD or HEAD~K).")
    var version: VersionArgument = VersionArgument(.head)
    @Flag(help: "With --store: install the version on a model folder other than the one it was made on.")
    var allowOtherBaseModel = false

    /// The version, verified and checked against `folder`'s weights, with its store; nil without --store.
    func load(for folder: ModelFolder) throws -> (store: CheckpointStore, version: LoadedVersion)? {
        guard let store else { return nil }
        return try runMapped {
            let s = try CheckpointStore(at: URL(fileURLWithPath: store), recover: .leftovers)
            let loaded = try s.load(version.ref)
            if !allowOtherBaseModel {
                try loaded.manifest.requireBaseModel(PipelineResources.hashes(modelFolder: folder.url, editorFolder: nil).model)
            }
            return (s, loaded)
        }
    }

    /// Installs the version's edits on `folder`'s model; returns a label for output, nil without --store.
    /// A version that stores part of its state is rebuilt with the editor in `editor`.
    @discardableResult
    func install(on folder: ModelFolder, editor: URL) throws -> String? {
        guard let (store, loaded) = try load(for: folder) else { return nil }
        let tensors = try wholeState(loaded, in: store, model: folder, editor: editor)
        try runMapped { try EditedModelExport.install(tensors, on: folder.model) }
        return "version \(loaded.manifest.version) of \(self.store!)"
    }
}

/// A stored version's whole edit state: as stored, or, for a version that stores only what its editor
/// cannot rebuild (`replay_edits`) or leaves out what it derives (`derived`), completed with the editor in
/// `editor` (which must be the one that made it).
func wholeState(_ loaded: LoadedVersion, in store: CheckpointStore, model folder: ModelFolder, editor: URL) throws -> [String: Tensor] {
    guard loaded.manifest.needsEditor else { return loaded.tensors }
    return try runMapped {
        let hash = PipelineResources.hashes(modelFolder: folder.url, editorFolder: editor).editor
        try VersionReplay.requireEditor(loaded.manifest, hash)
        let tokenizer = try folder.tokenizer ?? Tokenizer.load(folder: folder.url)
        let ed = try EditorRegistry.load(from: editor, model: folder.model, tokenizer: tokenizer)
        defer { folder.model.clearEdits() }
        return try VersionReplay.state(of: loaded, in: store, editor: ed, editorSHA256: hash).tensors()
    }
}
