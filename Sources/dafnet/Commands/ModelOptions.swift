import ArgumentParser
import Foundation
import LanguageModel

/// The embedded default: resources shipped in `samples/` beside the executable's package.
enum Embedded {
    /// Looks for `samples/` in the current directory, then next to the executable's package root.
    static func samples() -> URL {
        let cwd = URL(fileURLWithPath: FileManager.default.currentDirectoryPath).appendingPathComponent("samples")
        if FileManager.default.fileExists(atPath: cwd.path) { return cwd }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<5 {
            let candidate = dir.appendingPathComponent("samples")
            if FileManager.default.fileExists(atPath: candidate.path) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return cwd
    }

    static var model: URL { samples().appendingPathComponent("model") }
}

/// `--model DIR` (default: the embedded sample model).
struct ModelOption: ParsableArguments {
    @Option(name: .long, help: "A Hugging Face model folder (config.json, model.safetensors, tokenizer.json). Default: samples/model.")
    var model: String?

    var url: URL { model.map { URL(fileURLWithPath: $0) } ?? Embedded.model }

    func load(requireTokenizer: Bool = false) throws -> ModelFolder {
        try runMapped { try ModelFolder.load(url, requireTokenizer: requireTokenizer) }
    }
}

/// JSON printing shared by the commands.
func printJSON<T: Encodable>(_ value: T) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    print(String(decoding: try enc.encode(value), as: UTF8.self))
}
