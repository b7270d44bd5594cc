import ArgumentParser
import Foundation
import Editing
import LanguageModel

struct CheckReference: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-reference",
        abstract: "Compare a model folder (or a DAFNet auxiliary-network folder) with numbers from the peer implementation.",
        discussion: "Prints a table of the largest errors; exits 1 if any is beyond tolerance.")

    @Argument(help: "A folder in the layout of the gpt2-tiny or the dafnet-aux fixture.")
    var folder: String
    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let url = URL(fileURLWithPath: folder)
        let report = try runMapped {
            AuxReference.recognises(url) ? try AuxReference.check(folder: url) : try LanguageModelReference.check(folder: url)
        }
        if json { try printJSON(report) } else { print(report.table()) }
        if !report.passed { throw ExitCode(ExitStatus.checkFailed) }
    }
}
