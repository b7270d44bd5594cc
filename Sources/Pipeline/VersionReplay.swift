import Editing
import Foundation
import Storage
import TensorCore

/// Stored versions as edit states. A version committed with `replay_edits` stores only the tensors its
/// editor cannot rebuild (for DAFNet the past's per-edit projections and the router's keys, not ΔW or
/// the least-squares sums): its state is that of the nearest ancestor holding a whole state (or the empty
/// state) with the batches since applied again, exactly as the daemon applied them, and checked against
/// what the version stores. A whole version may leave out what its editor derives from the rest (`derived`:
/// DAFNet's least-squares ΔW, solved again from the stored sums).
public enum VersionReplay {
    /// Throws when `m` needs its editor to load (`Manifest.needsEditor`) and was made by an editor other than
    /// the one whose weights hash to `editorSHA256` (nothing is checked where either is unknown).
    public static func requireEditor(_ m: Manifest, _ editorSHA256: String?) throws {
        if m.needsEditor, let made = m.editorSHA256, let given = editorSHA256, made != given {
            throw PipelineError.replay(version: m.version, reason: "it was made by the editor with weights sha256 \(made), "
                                       + "and rebuilding it needs that editor (--editor); the editor given has \(given)")
        }
    }

    /// A version's whole edit state as a walk over versions carries it: the state (installed on the editor's
    /// model) and, when the walk read it, the edit log it holds.
    public struct Rebuilt {
        public let version: Int
        public let state: EditorState
        var log: EditLog?
        /// The edits replayed since the nearest whole version (0: the version is whole).
        let replayed: Int
    }

    /// The edit state of `loaded` (a version of `store`), installed on the editor's model. `editorSHA256`
    /// (the editor's weights) must be the one the version was made with when it has to be replayed.
    public static func state(of loaded: LoadedVersion, in store: CheckpointStore, editor: SequentialEditor,
                             editorSHA256: String?) throws -> EditorState {
        try rebuilt(loaded, in: store, editor: editor, editorSHA256: editorSHA256).state
    }

    /// The same, kept for a walk (`continuing`).
    public static func rebuilt(_ loaded: LoadedVersion, in store: CheckpointStore, editor: SequentialEditor,
                               editorSHA256: String?) throws -> Rebuilt {
        let m = loaded.manifest
        guard let expected = m.replayEdits else {
            let state = try editor.restoreState(loaded.tensors)
            guard let derived = m.derived else {
                editor.install(state)
                return Rebuilt(version: m.version, state: state, log: nil, replayed: 0)
            }
            // What the daemon computed after the batch, computed again: the same function on the same stored
            // tensors, at the thread count the batch was applied with.
            try requireEditor(m, editorSHA256)
            try editor.replay([ReplayBatch(requests: [], superseded: [], blasThreads: m.blasThreads)], onto: state)
            let made = state.derivedFromRest
            if let missing = derived.first(where: { !made.contains($0) }) {
                throw PipelineError.replay(version: m.version, reason: "its editor does not compute the derived tensor '\(missing)' from the rest")
            }
            return Rebuilt(version: m.version, state: state, log: nil, replayed: 0)
        }
        try requireEditor(m, editorSHA256)
        let (base, chain) = try store.replayChain(of: m.version)
        let state: EditorState
        var log: EditLog
        if let base {
            let source = try store.source(.number(base))
            state = try editor.restoreState(try baseTensors(source, of: loaded))
            log = try EditLog.load(from: source)
        } else {
            state = try editor.newState(foldingAs: loaded.tensors)
            log = EditLog()
        }
        let batches = try replayBatches(of: loaded, links: chain, in: store, after: &log)
        try checkCount(m, replayed: batches.reduce(0) { $0 + $1.requests.count })
        try editor.replay(batches, onto: state)
        try check(state, against: loaded, replayed: expected)
        return Rebuilt(version: m.version, state: state, log: log, replayed: expected)
    }

    /// `loaded`, a version stored in part whose parent is the version `previous` holds, rebuilt by applying its
    /// one batch to `previous`'s state (which it takes: the state is folded in place), with the same checks
    /// as a rebuild from the nearest whole version and the same result, since a replay applies its batches
    /// one by one. What a walk over a store's versions in order (`checkpoints verify --rebuild`) uses instead
    /// of replaying each version's whole chain again. `finish` false skips what only the installed state needs
    /// (a least-squares ΔW's solve) and leaves the state uninstalled: the walk checks only what versions store.
    public static func continuing(_ previous: Rebuilt, to loaded: LoadedVersion, in store: CheckpointStore,
                                  editor: SequentialEditor, editorSHA256: String?, finish: Bool = true) throws -> Rebuilt {
        let m = loaded.manifest
        guard let expected = m.replayEdits, m.parent == previous.version else {
            throw PipelineError.replay(version: m.version, reason: "it does not continue version \(previous.version) by replay")
        }
        try requireEditor(m, editorSHA256)
        var log = try previous.log ?? EditLog.load(from: store, version: previous.version)
        let batches = try replayBatches(of: loaded, links: [try store.link(m.version)], in: store, after: &log)
        try checkCount(m, replayed: previous.replayed + batches.reduce(0) { $0 + $1.requests.count })
        try editor.replay(batches, onto: previous.state, finish: finish)
        try check(previous.state, against: loaded, replayed: expected)
        return Rebuilt(version: m.version, state: previous.state, log: log, replayed: expected)
    }

    /// The batches of the versions `links` (oldest first, ending with `loaded`), after the edits `log` holds;
    /// `log` is extended by them. The version's log holds every edit of its lineage; each version on the way
    /// added one batch.
    static func replayBatches(of loaded: LoadedVersion, links: [ManifestLink], in store: CheckpointStore,
                              after log: inout EditLog) throws -> [ReplayBatch] {
        let m = loaded.manifest
        // Only the batches' own edits are decoded, and the version's own log is read once.
        let versionLog = try EditLog.load(from: VersionTensorSource(store: store, manifest: m))
        var start = log.count
        var batches: [ReplayBatch] = []
        for v in links {
            let end = v.version == m.version ? versionLog.count : try EditLog.count(of: v, in: store)
            guard start <= end, end <= versionLog.count else {
                throw PipelineError.replay(version: m.version, reason: "the edit log of version \(v.version) does not extend its parent's")
            }
            let requests = try versionLog.edits(start..<end)
            batches.append(ReplayBatch(requests: requests, superseded: try log.superseded(by: requests), blasThreads: v.blasThreads))
            try log.append(requests)
            start = end
        }
        return batches
    }

    /// The edits a rebuild replays must be the number the manifest records.
    static func checkCount(_ m: Manifest, replayed: Int) throws {
        guard replayed == m.replayEdits else {
            throw PipelineError.replay(version: m.version, reason: "its manifest says \(m.replayEdits ?? 0) edits are replayed, its log holds \(replayed)")
        }
    }

    /// What a replay rebuilt must be what the version stores, bit for bit (`expected`: the edits its manifest
    /// says are replayed, for the message).
    static func check(_ state: EditorState, against loaded: LoadedVersion, replayed expected: Int) throws {
        let m = loaded.manifest
        let rebuilt = state.tensors()
        let derived = state.rebuiltByReplay
        for name in Set(rebuilt.keys).subtracting(derived).union(loaded.tensors.keys).sorted() {
            guard let a = rebuilt[name], let b = loaded.tensors[name], a.shape == b.shape,
                  memcmp(a.data, b.data, a.count * 4) == 0 else {
                throw PipelineError.replay(version: m.version, reason: "replaying its \(expected) edits does not give the stored tensor '\(name)'")
            }
        }
    }

    /// The tensors of `base`, an ancestor of `loaded`: each one whose stored parts begin `loaded`'s tensor of
    /// the same name (rows it only grew by since) is cut from `loaded`'s, already read and verified; the rest
    /// are read from the store, each checked against its recorded hashes.
    static func baseTensors(_ base: VersionTensorSource, of loaded: LoadedVersion) throws -> [String: Tensor] {
        let own = Dictionary(uniqueKeysWithValues: loaded.manifest.tensors.map { ($0.name, $0) })
        var out: [String: Tensor] = [:]
        var read: [String] = []
        for e in base.manifest.tensors {
            if let mine = own[e.name], let t = loaded.tensors[e.name], e.bytes <= mine.bytes,
               e.shape.dropFirst() == mine.shape.dropFirst(), Array(mine.parts.prefix(e.parts.count)) == e.parts {
                let cut = Tensor(shape: e.shape)
                cut.data.update(from: t.data, count: cut.count)
                out[e.name] = cut
            } else {
                read.append(e.name)
            }
        }
        return out.merging(try base.tensors(read)) { a, _ in a }
    }
}
