import ArgumentParser
import Foundation
import Storage

/// `dafnet rollback --to V | --steps K`: make an earlier (or later) version current. Nothing is
/// deleted: later versions stay listed and `--to` can roll forward to them. Recorded in the store's
/// history.jsonl.
struct Rollback: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make version V current (or go back K parents); later versions stay and can be rolled forward to.")

    @OptionGroup var location: StoreLocationOptions
    @Option(help: "The version to make current: a number, HEAD~K, or `base` (or 0) for the unedited model.") var to: String?
    @Option(help: "Go back K parents from HEAD.") var steps: Int?

    func validate() throws {
        guard (to == nil) != (steps == nil) else { throw ValidationError("give exactly one of --to V or --steps K") }
        if let steps, steps < 0 { throw ValidationError("--steps must be 0 or more") }
        if let to, !Self.isBase(to), (try? VersionRef(parsing: to)) == nil {
            throw ValidationError("--to: '\(to)' is not a version (a number, HEAD~K, or base)")
        }
    }

    func run() throws {
        try runMapped {
            let store = try location.open()
            let record: HistoryRecord
            if let steps { record = try store.rollback(steps: steps) }
            else if Self.isBase(to!) { record = try store.rollbackToBase() }
            else { record = try store.rollback(to: try VersionRef(parsing: to!)) }
            func name(_ v: Int?) -> String { v.map { "version \($0)" } ?? "the unedited base model" }
            print(record.from == record.version ? "HEAD is already \(name(record.version))"
                                                : "HEAD: \(name(record.from)) → \(name(record.version))")
        }
    }

    static func isBase(_ s: String) -> Bool { ["base", "0"].contains(s.lowercased()) }
}
