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
    @Option(help: "The version to make current: a number, HEAD~K.") var to: VersionArgument?
    @Option(help: "Go back K parents from HEAD.") var steps: Int?

    func validate() throws {
        guard (to == nil) != (steps == nil) else { throw ValidationError("give exactly one of --to V or --steps K") }
        if let steps, steps < 0 { throw ValidationError("--steps must be 0 or more") }
    }

    func run() throws {
        try runMapped {
            let store = try location.open()
            let record = try steps.map { try store.rollback(steps: $0) } ?? store.rollback(to: to!.ref)
            let from = record.from.map(String.init) ?? "-"
            print(record.from == record.version ? "HEAD is already version \(record.version ?? 0)"
                                                : "HEAD: version \(from) → \(record.version ?? 0)")
        }
    }
}
