import Foundation
import LanguageModel
import Storage
import TensorCore
import Tokenizers

/// The editing methods, by the name `editor.json` gives in its `method` field.
public enum EditorMethod: String, Codable, Sendable, CaseIterable {
    /// DAFNet: a meta-trained auxiliary network with inter-edit fusion (`DAFNetEditor`).
    case dafnet
    /// MEND-like ablation of DAFNet: the same per-token network, no sequence fusion (`DAFNetEditor`).
    case mend
    /// The fine-tuning baseline (`FineTuneEditor`).
    case ft
    /// MEMIT: closed-form least-squares updates of MLP output projections, no training (`MEMITEditor`).
    case memit
    /// AlphaEdit: MEMIT's update projected onto the null space of preserved keys, earlier edits' keys kept (`MEMITEditor`).
    case alphaedit
}

/// What an editor keeps between calls. The store keeps it as named tensors without knowing the method;
/// every method names the edits it installs `delta_weight.<module>` ([in, out]) and `delta_bias.<module>`
/// ([out]), so export and `generate --store` install any method's state. The rest is the method's own.
public protocol EditorState: AnyObject {
    var editCount: Int { get }
    /// Named tensors for the checkpoint store.
    func tensors() -> [String: Tensor]
    /// The installed edits of a module.
    func delta(_ module: String) -> (weight: Tensor?, bias: Tensor?)
    /// A module's frozen shards' ΔW (`ls_shard_edits`), in shard order: rows routed to shard s add the s-th.
    func frozenDeltas(_ module: String) -> [Tensor]
    /// Which inputs see the edits (nil: all).
    var router: EditRouter? { get }
    /// The names among `tensors()` that `SequentialEditor.replay` of the state's edits rebuilds exactly from
    /// the rest, so that a stored version may leave them out (empty: every tensor must be stored).
    var rebuiltByReplay: Set<String> { get }
    /// The names among `tensors()` that `SequentialEditor.replay` with no batches computes exactly from the
    /// rest, so that a version holding its whole state may leave them out (empty: none).
    var derivedFromRest: Set<String> { get }
    /// Whether storing the whole state costs little beyond what a store already holds of its earlier states
    /// (a sharded least-squares state just after a shard was frozen: no sums, and frozen shards that earlier
    /// versions share), so that a version may as well store it whole and spare later loads a replay.
    var wholeCostsLittle: Bool { get }
}

extension EditorState {
    public var router: EditRouter? { nil }
    public func frozenDeltas(_ module: String) -> [Tensor] { [] }
    public var rebuiltByReplay: Set<String> { [] }
    public var derivedFromRest: Set<String> { [] }
    public var wholeCostsLittle: Bool { false }

    /// Bytes held.
    public var byteCount: Int { tensors().values.reduce(0) { $0 + $1.count * 4 } }
}

/// An editor that applies edits in order to a model, folding them into an `EditorState`. The daemon, the
/// CLI and the benchmarks use editors only through this protocol and `EditorRegistry`.
public protocol SequentialEditor: AnyObject {
    var method: EditorMethod { get }
    var model: TransformerLM { get }
    var tokenizer: Tokenizer { get }
    /// HF names of the linear modules whose edits the state holds.
    var moduleNames: [String] { get }
    /// The state before any edit.
    func newState() -> EditorState
    /// The state before any edit, folding as the state `tensors` (a stored version reached from it by
    /// replay) records it was folded: what a replay from nothing starts from.
    func newState(foldingAs tensors: [String: Tensor]) throws -> EditorState
    /// A state from the tensors `EditorState.tensors()` wrote (for example a stored version).
    func restoreState(_ tensors: [String: Tensor]) throws -> EditorState
    /// Applies `requests` in order, folds them into `state`, and installs the result on the model.
    @discardableResult func apply(_ requests: [EditRequest], to state: EditorState) throws -> EditTimings
    /// The same, where `requests` replace the earlier edits `superseded` (already in `state`: the same
    /// facts with older targets). An editor whose state keeps each edit's pull as a sum takes the earlier
    /// edits out of it first; the default applies `requests` over them, as editors that fit each new edit on
    /// the edited model (FT, MEMIT) do.
    @discardableResult func apply(_ requests: [EditRequest], to state: EditorState, superseding superseded: [PriorEdit]) throws -> EditTimings
    /// Applies stored batches again, in order, onto `state` (the state of the version they start from), with
    /// the same result bit for bit as the `apply` calls that made them; installs the result. An editor may skip
    /// work that a later batch makes moot. `finish` false leaves what the replay would compute last from the
    /// rest (`EditorState.rebuiltByReplay` tensors that nothing folded later reads, such as a least-squares ΔW)
    /// stale and the state uninstalled: for a walk that checks only the tensors a version stores and goes on
    /// folding (an editor without such a step ignores it).
    func replay(_ batches: [ReplayBatch], onto state: EditorState, finish: Bool) throws
}

/// An edit a state already holds, with its place in the state's sequence of edits (0 for the first edit
/// applied; the index of its line in a version's edit log).
public struct PriorEdit: Sendable {
    public var request: EditRequest
    public var ordinal: Int

    public init(_ request: EditRequest, ordinal: Int) { self.request = request; self.ordinal = ordinal }
}

/// One batch of a replay: its edits, the earlier edits it superseded, and the OpenBLAS thread count it was
/// applied with (nil: unknown, replayed at the current count).
public struct ReplayBatch: Sendable {
    public var requests: [EditRequest]
    public var superseded: [PriorEdit]
    public var blasThreads: Int?

    public init(requests: [EditRequest], superseded: [PriorEdit], blasThreads: Int? = nil) {
        self.requests = requests
        self.superseded = superseded
        self.blasThreads = blasThreads
    }

    /// Runs `body` at the thread count the batch was applied with: OpenBLAS sums some products differently
    /// at one and at two threads, and a replay must repeat the batch's arithmetic bit for bit.
    @discardableResult
    public func atItsThreadCount<T>(_ body: () throws -> T) rethrows -> T {
        guard let n = blasThreads else { return try body() }
        return try BLAS.withThreads(n, body)
    }
}

extension SequentialEditor {
    @discardableResult
    public func apply(_ requests: [EditRequest], to state: EditorState, superseding superseded: [PriorEdit]) throws -> EditTimings {
        try apply(requests, to: state)
    }

    public func newState(foldingAs tensors: [String: Tensor]) throws -> EditorState { newState() }

    /// Replays and finishes (`replay(_:onto:finish:)`).
    public func replay(_ batches: [ReplayBatch], onto state: EditorState) throws {
        try replay(batches, onto: state, finish: true)
    }

    public func replay(_ batches: [ReplayBatch], onto state: EditorState, finish: Bool) throws {
        for b in batches { try b.atItsThreadCount { try apply(b.requests, to: state, superseding: b.superseded) } }
        install(state)
    }

    public var methodName: String { method.rawValue }

    /// The lowest block holding an edited module: the blocks below it never change.
    public var firstEditedBlock: Int {
        let edited = Set(moduleNames)
        return (0..<model.spec.layers).first { !edited.isDisjoint(with: model.spec.linearModules(layer: $0)) } ?? model.spec.layers
    }

    /// prompt + target (the target with a leading space), scored on the target tokens.
    public func scored(_ prompt: String, _ target: String) -> ScoredPrompt {
        ScoredPrompt(prompt: prompt, target: target, tokenizer: tokenizer)
    }

    /// The tokens of `prefix + r.prompt` (of `promptTokens` tokens) that spell the edit's subject, at its
    /// first occurrence; nil when the edit names no subject or the prompt does not contain it.
    public func subjectTokens(_ r: EditRequest, prefix: String = "", promptTokens: Int) -> Range<Int>? {
        guard let s = r.subject, !s.isEmpty, let range = r.prompt.range(of: s) else { return nil }
        // Up to the subject without the space before it (byte-level BPE and SentencePiece put it in the subject's first token).
        var before = prefix + String(r.prompt[..<range.lowerBound])
        while before.last?.isWhitespace == true { before.removeLast() }
        let start = before.isEmpty ? 0 : tokenizer.encode(before).count
        let end = min(tokenizer.encode(prefix + String(r.prompt[..<range.upperBound])).count, promptTokens)
        guard end > 0 else { return nil }
        return min(start, end - 1)..<end
    }

    /// Installs a state's ΔW/Δb as the model's module edits.
    public func install(_ state: EditorState) {
        for m in moduleNames {
            let (w, b) = state.delta(m)
            model.linears[m]!.deltaWeight = w
            model.linears[m]!.deltaBias = b
            model.linears[m]!.frozenDeltaWeights = state.frozenDeltas(m)
        }
        model.router = state.router
    }

    /// `state` as this editor's own state type, or a typed error naming the method.
    func own<S: EditorState>(_ state: EditorState, as type: S.Type) throws -> S {
        guard let s = state as? S else {
            throw EditingError.foreignState(method: method, reason: "the edit state was made by another method (\(Swift.type(of: state)))")
        }
        return s
    }
}

/// One seam from an editor folder to its implementation: `editor.json`'s `method` picks the loader.
/// A new method is one file with a type conforming to `SequentialEditor` and one line in `loaders`.
public enum EditorRegistry {
    public typealias Loader = (_ folder: URL, _ model: TransformerLM, _ tokenizer: Tokenizer) throws -> SequentialEditor

    static let loaders: [EditorMethod: Loader] = [
        .dafnet: { try DAFNetEditor.load(from: $0, model: $1, tokenizer: $2) },
        .mend: { try DAFNetEditor.load(from: $0, model: $1, tokenizer: $2) },
        .ft: { try FineTuneEditor.load(from: $0, model: $1, tokenizer: $2) },
        .memit: { try MEMITEditor.load(from: $0, model: $1, tokenizer: $2) },
        .alphaedit: { try MEMITEditor.load(from: $0, model: $1, tokenizer: $2) },
    ]

    /// The fields every `editor.json` has, whatever its method.
    public struct Header: Decodable, Sendable {
        public var method: EditorMethod
        public var modules: [String]
        /// The model the editor was made for (a folder name), when it records one.
        public var baseModel: String?

        enum CodingKeys: String, CodingKey { case method, modules, baseModel = "base_model" }
    }

    public static let configFile = "editor.json"
    public static let weightsFile = "editor.safetensors"

    /// Creates `folder` and writes `config` as its `editor.json` (sorted keys, pretty-printed).
    public static func writeConfig<T: Encodable>(_ config: T, to folder: URL) throws {
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        try enc.encode(config).write(to: folder.appendingPathComponent(configFile), options: .atomic)
    }

    /// Reads a folder's `editor.json` as a method's configuration (or its `Header`); a missing file, a missing
    /// key or a bad setting names the file and the field (for `method`, the methods there are).
    public static func readConfig<T: Decodable>(_ type: T.Type, from folder: URL) throws -> T {
        try readConfig(type, file: folder.appendingPathComponent(configFile))
    }

    /// The same for a settings file of any name.
    public static func readConfig<T: Decodable>(_ type: T.Type, file url: URL) throws -> T {
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw EditingError.invalidInput("\(url.path): file not found")
        }
        do { return try JSONDecoder().decode(T.self, from: data) } catch let DecodingError.dataCorrupted(ctx) {
            let field = ctx.codingPath.map(\.stringValue).joined(separator: ".")
            let methods = field == "method" ? " (methods: \(EditorMethod.allCases.map(\.rawValue).joined(separator: ", ")))" : ""
            throw EditingError.invalidConfig(file: url.path, field: field.ifEmpty("(document)"), reason: ctx.debugDescription + methods)
        } catch let DecodingError.keyNotFound(key, _) {
            throw EditingError.invalidConfig(file: url.path, field: key.stringValue, reason: "missing")
        } catch {
            throw EditingError.invalidConfig(file: url.path, field: "(document)", reason: "\(error)")
        }
    }

    /// Reads an editor folder's header (method, modules, model).
    public static func header(of folder: URL) throws -> Header { try readConfig(Header.self, from: folder) }

    /// Loads the editor in `folder` for `model`, after checking that its modules are the model's.
    public static func load(from folder: URL, model: TransformerLM, tokenizer: Tokenizer) throws -> SequentialEditor {
        let h = try header(of: folder)
        try checkFits(modules: h.modules, editor: folder.path, madeFor: h.baseModel, model: model)
        guard let loader = loaders[h.method] else {
            throw EditingError.invalidConfig(file: folder.appendingPathComponent(configFile).path, field: "method",
                                             reason: "\"\(h.method.rawValue)\" has no implementation")
        }
        return try loader(folder, model, tokenizer)
    }

    /// Every module of an editor must be a linear module of the model.
    public static func checkFits(modules: [String], editor: String, madeFor: String?, model: TransformerLM) throws {
        for m in modules where model.linears[m] == nil {
            throw EditingError.editorDoesNotFit(editor: editor, madeFor: madeFor, module: m, modelLinears: model.linearModuleNames)
        }
    }
}

extension TransformerLM {
    /// The HF names of the model's linear modules, in block order.
    public var linearModuleNames: [String] { (0..<spec.layers).flatMap { spec.linearModules(layer: $0) } }
}

extension String {
    func ifEmpty(_ other: String) -> String { isEmpty ? other : self }
}
