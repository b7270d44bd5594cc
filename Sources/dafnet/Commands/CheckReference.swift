import ArgumentParser
import Foundation
import LanguageModel

struct CheckReference: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-reference",
        abstract: "Compare a model folder with reference.json/reference.safetensors from the peer implementation.",
        discussion: "Prints a table of the largest errors; exits 1 if any is beyond tolerance.")

    @Argument(help: "A folder in the layout of the gpt2-tiny fixture.")
    var folder: String
    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let url = URL(fileURLWithPath: folder)
        let report = try runMapped { try LanguageModelReference.check(folder: url) }
        if json { try printJSON(report) } else { print(report.table()) }
        if !report.passed { throw ExitCode(1) }
    }
}
