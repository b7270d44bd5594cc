/// Errors of the editors.
public enum EditingError: Error, CustomStringConvertible, Equatable, Sendable {
    case shapeMismatch(name: String, expected: [Int], found: [Int], file: String)
    case invalidConfig(file: String, field: String, reason: String)
    case unknownModule(String)
    /// An editor folder names a module the model lacks: which folder, the model it was made for (when it
    /// records one), the module, and the model's linear modules to choose from.
    case editorDoesNotFit(editor: String, madeFor: String?, module: String, modelLinears: [String])
    /// An edit state made by another method (or another editor's modules) was handed to an editor.
    case foreignState(method: EditorMethod, reason: String)
    case invalidInput(String)
    /// A routed edit state cannot be merged into plain weights without dropping its routing.
    case routedExport
    /// An edit state split into shards (`ls_shard_edits`) has one ΔW per shard, chosen per input by routing.
    case shardedExport

    public var description: String {
        switch self {
        case let .shapeMismatch(name, expected, found, file): return "\(file): tensor \"\(name)\" has shape \(found), expected \(expected)"
        case let .invalidConfig(file, field, reason): return "\(file): field \"\(field)\": \(reason)"
        case let .unknownModule(m): return "module \"\(m)\" is not a linear module of the model"
        case let .editorDoesNotFit(editor, madeFor, module, linears):
            let made = madeFor.map { "made for the model \($0)" } ?? "which records no model"
            let shown = linears.count > 24 ? Array(linears.prefix(24)) + ["… (\(linears.count) in all)"] : linears
            return "editor \(editor) (\(made)) edits \"\(module)\", which is not a linear module of this model; "
                + "its linear modules are: \(shown.joined(separator: ", ")). "
                + "Make an editor for this model with `dafnet editor create --method memit|alphaedit --model DIR --out DIR` "
                + "(no training) or `dafnet train-editor --model DIR`"
        case let .foreignState(method, reason): return "\(method.rawValue) editor: \(reason)"
        case let .invalidInput(msg): return msg
        case .routedExport:
            return "the version's edits are routed (the editor's route_threshold: they apply only to inputs near an edit's key), "
                + "which a model folder's weights cannot express; --unrouted merges them for every input instead"
        case .shardedExport:
            return "the version's edits are split into shards (the editor's ls_shard_edits), each with its own ΔW that routing picks "
                + "per input; a model folder's weights can hold only one, so it cannot be exported (even --unrouted)"
        }
    }
}
