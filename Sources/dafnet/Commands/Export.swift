import ArgumentParser
import Editing
import Foundation
import LanguageModel
import Pipeline
import Storage

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a Hugging Face model folder with a version's edits merged into the base weights.")

    @OptionGroup var location: StoreLocationOptions
    @OptionGroup var model: ModelOption
    @OptionGroup var editorOption: EditorOption
    @Option(help: "The version: a number, HEAD or HEAD~K.")
    var version: VersionArgument = VersionArgument(.head)
    @Option(help: "Output folder.")
    var out: String
    @Option(help: "Stored dtype: F32, F16 or BF16.")
    var dtype = "F32"
    @Flag(help: "Apply the version to a model folder other than the one it was made on (by default an error naming both weight hashes).")
    var allowOtherBaseModel = false
    @Flag(help: "For a routed version (route_threshold): merge its edits for every input, dropping the routing.")
    var unrouted = false

    func run() throws {
        guard let dt = SafetensorsDType(rawValue: dtype.uppercased()), [.F32, .F16, .BF16].contains(dt) else {
            throw ValidationError("--dtype must be F32, F16 or BF16")
        }
        let folder = try model.load()
        var resolved = 0
        try runMapped {
            let store = try location.openForReading()
            let loaded = try store.load(version.ref)
            resolved = loaded.manifest.version
            if !allowOtherBaseModel {
                try loaded.manifest.requireBaseModel(PipelineResources.hashes(modelFolder: model.url, editorFolder: nil).model)
            }
            let tensors = try wholeState(loaded, in: store, model: folder, editor: editorOption.url)
            let m = loaded.manifest
            let provenance = EditedModelExport.Provenance(store: location.url.standardizedFileURL.path, version: m.version,
                                                          stateSHA256: m.stateSHA256, baseModelSHA256: m.baseModelSHA256, dtype: dt)
            try EditedModelExport.export(model: folder, state: tensors, to: URL(fileURLWithPath: out), dtype: dt, provenance: provenance,
                                          unrouted: unrouted)
        }
        print("wrote \(out) (version \(resolved))")
    }
}
