import ArgumentParser
import Editing
import Foundation
import Pipeline
import Storage

/// `--store DIR`, shared by every command that works on the checkpoint store.
struct StoreLocationOptions: ParsableArguments {
    @Option(name: .long, help: "The checkpoint store folder.")
    var store: String = CheckpointStore.defaultPath

    var url: URL { URL(fileURLWithPath: store) }

    /// The store, for a command that changes it: every leftover of an interrupted operation cleaned first.
    func open(create: Bool = false) throws -> CheckpointStore {
        try CheckpointStore(at: url, create: create)
    }

    /// The store, for a command that only reads it: what a read could trip over cleaned, unreferenced
    /// blobs left to the next writer (finding them reads every manifest).
    func openForReading() throws -> CheckpointStore {
        try CheckpointStore(at: url, recover: .leftovers)
    }
}

/// A version on the command line: a number, `HEAD` or `HEAD~K`.
struct VersionArgument: ExpressibleByArgument {
    let ref: VersionRef

    init?(argument: String) {
        guard let ref = try? VersionRef(parsing: argument) else { return nil }
        self.ref = ref
    }

    init(_ ref: VersionRef) { self.ref = ref }

    var defaultValueDescription: String { "\(ref)" }
}

/// `dafnet checkpoints …`: inspect and maintain the checkpoint store.
struct Checkpoints: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect and maintain the checkpoint store (versions of the edit state).",
        subcommands: [List.self, Show.self, Edits.self, Diff.self, Verify.self, GC.self, History.self, Repair.self]
    )

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the versions (* marks HEAD).")
        @OptionGroup var location: StoreLocationOptions
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let rows = try runMapped { try location.openForReading().summaries() }
            print(json ? try runMapped { try StoreText.json(rows) } : StoreText.list(rows))
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a version's manifest.")
        @OptionGroup var location: StoreLocationOptions
        @Argument(help: "A version number, HEAD or HEAD~K.") var version: VersionArgument = VersionArgument(.head)
        @Flag(help: "Print the manifest JSON as stored (with state_sha256).") var json = false

        func run() throws {
            try runMapped {
                let store = try location.openForReading()
                let v = try store.resolve(version.ref)
                if json {
                    let data = try store.manifestData(v)
                    _ = try store.manifest(v)  // refuse a bad manifest
                    FileHandle.standardOutput.write(data)
                } else {
                    print(StoreText.show(try store.manifest(v), isHead: try store.head() == v))
                }
            }
        }
    }

    struct Edits: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The edits version V holds, in order, with the batch and version each came from.")
        @OptionGroup var location: StoreLocationOptions
        @Argument(help: "A version number, HEAD or HEAD~K.") var version: VersionArgument = VersionArgument(.head)
        @Flag(help: "Print JSON Lines (one edit per line, with its version and batch).") var json = false

        func run() throws {
            try runMapped {
                let store = try location.openForReading()
                let v = try store.resolve(version.ref)
                var n = 0
                for part in try EditLog.lineage(of: v, in: store) {
                    for e in part.edits {
                        n += 1
                        if json {
                            var line = try JSONValue(parsing: try EditBatch.line(e)).objectValue ?? [:]
                            line["version"] = .int(Int64(part.version))
                            line["batch"] = part.batch.map { .string($0) } ?? .null
                            print(JSONValue.object(line).description)
                        } else {
                            print("\(n). v\(part.version) \(part.batch ?? "-"): \(e.prompt) → \(e.targetNew)")
                        }
                    }
                }
                if !json { print("(\(n) edits in version \(v))") }
            }
        }
    }

    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Per-tensor changes from version V to version W; with --facts, which edits W holds that V does not and the reverse.")
        @OptionGroup var location: StoreLocationOptions
        @Argument(help: "The first version.") var from: VersionArgument
        @Argument(help: "The second version.") var to: VersionArgument = VersionArgument(.head)
        @Flag(help: "The facts that changed: edits only in W (+) and only in V (−), by prompt and target.") var facts = false
        @Flag(help: "Compare whole states: a version that stores part of its state (replay_edits) is rebuilt first with the model and editor (without it, what such a version leaves to the replay shows as removed or added).")
        var rebuild = false
        @OptionGroup var model: ModelOption
        @OptionGroup var editorOption: EditorOption
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            try runMapped {
                let store = try location.openForReading()
                let a = try store.resolve(from.ref), b = try store.resolve(to.ref)
                if facts {
                    func edits(_ v: Int) throws -> [(String, String, Int)] {
                        try EditLog.lineage(of: v, in: store).flatMap { part in part.edits.map { ($0.prompt, $0.targetNew, part.version) } }
                    }
                    let ea = try edits(a), eb = try edits(b)
                    let ka = Set(ea.map { $0.0 + "\u{0}" + $0.1 }), kb = Set(eb.map { $0.0 + "\u{0}" + $0.1 })
                    let added = eb.filter { !ka.contains($0.0 + "\u{0}" + $0.1) }, removed = ea.filter { !kb.contains($0.0 + "\u{0}" + $0.1) }
                    if json {
                        struct Fact: Encodable { var change: String; var prompt: String; var targetNew: String; var version: Int }
                        print(try StoreText.json(added.map { Fact(change: "added", prompt: $0.0, targetNew: $0.1, version: $0.2) }
                            + removed.map { Fact(change: "removed", prompt: $0.0, targetNew: $0.1, version: $0.2) }))
                    } else {
                        for e in added { print("+ \(e.0) → \(e.1)  (v\(e.2))") }
                        for e in removed { print("− \(e.0) → \(e.1)  (v\(e.2))") }
                        print("(\(added.count) edits only in version \(b), \(removed.count) only in version \(a))")
                    }
                    return
                }
                let va = try store.load(.number(a)), vb = try store.load(.number(b))
                let partial = [va, vb].filter { $0.manifest.needsEditor }.map(\.manifest.version)
                let rows: [TensorDifference]
                if rebuild && !partial.isEmpty {
                    let folder = try model.load(requireTokenizer: true)
                    rows = CheckpointStore.diff(try wholeState(va, in: store, model: folder, editor: editorOption.url),
                                                try wholeState(vb, in: store, model: folder, editor: editorOption.url))
                } else {
                    rows = CheckpointStore.diff(va.tensors, vb.tensors)
                }
                print(json ? try StoreText.json(rows) : StoreText.diff(rows, from: a, to: b))
                if !rebuild && !partial.isEmpty && !json {
                    print("(version\(partial.count == 1 ? "" : "s") \(partial.map(String.init).joined(separator: " and ")) store\(partial.count == 1 ? "s" : "") part of the state: "
                          + "the tensors the editor rebuilds show as removed or added; --rebuild compares whole states)")
                }
            }
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Re-hash every blob, decode every frame, check every manifest; exits 1 on a problem.")
        @OptionGroup var location: StoreLocationOptions
        @Flag(help: "Also rebuild every version that stores part of its state (replay_edits) or leaves out what its editor derives (derived) with the model and editor, check it against what it stores, and print the seconds each took.")
        var rebuild = false
        @Flag(help: "With --rebuild: rebuild each version from its nearest whole ancestor on its own, as a load does (each version's seconds are then its load's), instead of walking the versions in order, each continuing its parent's rebuilt state with its one batch.")
        var eachOnItsOwn = false
        @OptionGroup var model: ModelOption
        @OptionGroup var editorOption: EditorOption
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let store = try runMapped { try location.openForReading() }
            var report = try runMapped { try store.verify() }
            if rebuild { report.problems += try rebuildAll(store) }
            print(json ? try runMapped { try StoreText.json(report) } : StoreText.verify(report))
            if !report.isClean { throw ExitCode(ExitStatus.checkFailed) }
        }

        /// Rebuilds each version that needs its editor, printing its time; returns the problems. Versions are
        /// taken in order, and one stored in part whose parent was just rebuilt continues that state with its
        /// batch (the same result as its own rebuild, at a fraction of the cost) unless `eachOnItsOwn`.
        func rebuildAll(_ store: CheckpointStore) throws -> [String] {
            let manifests = try runMapped { try store.manifests() }
            guard manifests.contains(where: \.needsEditor) else { return [] }
            let folder = try model.load(requireTokenizer: true)
            let editor = try runMapped { try EditorRegistry.load(from: editorOption.url, model: folder.model, tokenizer: folder.tokenizer!) }
            let hash = PipelineResources.hashes(modelFolder: folder.url, editorFolder: editorOption.url).editor
            var problems: [String] = []
            var previous: VersionReplay.Rebuilt?
            for m in manifests where m.needsEditor {
                let t0 = Date()
                let last = previous
                previous = nil  // a continuation folds the state in place: after a failure it is not the parent's
                do {
                    let loaded = try store.load(.number(m.version))
                    let how: String
                    if !eachOnItsOwn, let last, m.replayEdits != nil, m.parent == last.version {
                        previous = try VersionReplay.continuing(last, to: loaded, in: store, editor: editor, editorSHA256: hash,
                                                                finish: false)
                        how = "continued from version \(last.version)"
                    } else {
                        previous = try VersionReplay.rebuilt(loaded, in: store, editor: editor, editorSHA256: hash)
                        how = m.replayEdits.map { "\($0) edits replayed" } ?? "derived tensors computed"
                    }
                    if !json { print("version \(m.version): rebuilt (\(how)) in " + String(format: "%.2f s", Date().timeIntervalSince(t0))) }
                } catch {
                    problems.append("version \(m.version): \(error)")
                }
            }
            folder.model.clearEdits()
            return problems
        }
    }

    struct GC: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "gc",
            abstract: "Remove unreferenced blobs; with --keep N, first remove all versions but HEAD and the N newest.")
        @OptionGroup var location: StoreLocationOptions
        @Option(help: "Keep HEAD and the N newest versions; remove the other manifests.") var keep: Int?
        @Flag(help: "Print JSON.") var json = false

        func validate() throws {
            if let keep, keep < 0 { throw ValidationError("--keep must be 0 or more") }
        }

        func run() throws {
            let report = try runMapped { try location.open().gc(keep: keep) }
            print(json ? try runMapped { try StoreText.json(report) } : StoreText.gc(report))
        }
    }

    struct Repair: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Repair a store whose store.json or HEAD was lost or damaged: writes store.json again, and sets HEAD to --to V, else to the history's last HEAD, else to the newest version that loads.")
        @OptionGroup var location: StoreLocationOptions
        @Option(help: "The version HEAD is set to (verified first).") var to: Int?

        func run() throws {
            try runMapped {
                if try CheckpointStore.repairMarker(at: location.url) { print("wrote \(location.store)/store.json") }
                let store = try location.open()
                if let r = try store.repairHead(to: to) {
                    print(r.version.map { "HEAD set to version \($0)" } ?? "no version loads: HEAD is the unedited base model")
                } else {
                    print("HEAD is version \(try store.head().map(String.init) ?? "none"): nothing to repair")
                }
            }
        }
    }

    struct History: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Every move of HEAD (commit, rollback, import) and every gc.")
        @OptionGroup var location: StoreLocationOptions
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let records = try runMapped { try location.openForReading().history() }
            print(json ? try runMapped { try StoreText.json(records) } : StoreText.history(records))
        }
    }
}
