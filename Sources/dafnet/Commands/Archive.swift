import ArgumentParser
import Foundation
import Storage

/// `dafnet archive create | restore`: move versions between stores as `.tar.zst` files.
struct Archive: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Archive a version (with its chain, evaluations and optionally the base model) or restore one.",
        subcommands: [Create.self, Restore.self]
    )

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write a version and its ancestors to FILE.tar.zst.")
        @OptionGroup var location: StoreLocationOptions
        @Option(help: "The version to archive.") var version: VersionArgument = VersionArgument(.head)
        @Option(help: "The archive to write (.tar.zst).") var out: String
        @Option(help: "Also archive the base model's files from this folder.") var includeModel: String?

        func run() throws {
            try runMapped {
                let report = try CheckpointArchive.create(store: try location.openForReading(), version: version.ref,
                                                          to: URL(fileURLWithPath: out),
                                                          includeModel: includeModel.map { URL(fileURLWithPath: $0) })
                print("wrote \(report.path): version \(report.version) (chain \(report.versions.map(String.init).joined(separator: " → "))), "
                    + "\(report.objects) blobs, \(report.evaluationFiles) evaluation files, \(report.modelFiles) model files, "
                    + "\(report.archiveBytes) bytes; sha256 \(report.sha256) in \(report.path)\(CheckpointArchive.checksumSuffix)")
            }
        }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check and import an archive. Into an empty store, versions keep their numbers and HEAD moves; "
                + "otherwise they are added as new versions and HEAD stays.")
        @OptionGroup var location: StoreLocationOptions
        @Argument(help: "The archive (.tar.zst).") var file: String
        @Option(help: "Where the base-model files go (default: STORE/models/NAME).") var modelOut: String?

        func run() throws {
            try runMapped {
                let store = try location.open(create: true)
                let report = try CheckpointArchive.restore(from: URL(fileURLWithPath: file), into: store,
                                                           modelDestination: modelOut.map { URL(fileURLWithPath: $0) })
                let mapping = report.versionMap.sorted { $0.key < $1.key }.map { "\($0.key)→\($0.value)" }.joined(separator: ", ")
                print("imported versions \(mapping); "
                    + (report.headMoved ? "HEAD is version \(report.restoredVersion)"
                                        : "HEAD unchanged (dafnet rollback --to \(report.restoredVersion) to use it)")
                    + (report.modelDirectory.map { "; base model in \($0)" } ?? "")
                    + (report.checksumVerified ? "; archive checksum verified" : "; no \(file)\(CheckpointArchive.checksumSuffix) beside it: archive.json itself was not checked"))
            }
        }
    }
}
