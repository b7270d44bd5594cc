import ArgumentParser
import Editing
import Foundation
import LanguageModel

extension Embedded {
    static var editor: URL { samples().appendingPathComponent("editor") }
    static var heldoutText: URL { samples().appendingPathComponent("world/heldout_text.txt") }
}

/// `--editor DIR` (default: the embedded sample editor).
struct EditorOption: ParsableArguments {
    @Option(name: .long, help: "An editor folder (editor.json, editor.safetensors). Default: samples/editor.")
    var editor: String?

    var url: URL { editor.map { URL(fileURLWithPath: $0) } ?? Embedded.editor }
}

/// The non-empty lines of a text file (one text per line), or an error naming the file.
func textLines(_ path: String) throws -> [String] {
    try runMapped { try String(contentsOfFile: path, encoding: .utf8) }.split(separator: "\n").map(String.init).filter { !$0.isEmpty }
}

/// Held-out text lines, tokenized.
func heldoutText(_ path: String?, tokenizer: (String) -> [Int], limit: Int? = nil) -> [[Int]] {
    let url = path.map { URL(fileURLWithPath: $0) } ?? Embedded.heldoutText
    let lines = ((try? String(contentsOf: url, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    return (limit.map { Array(lines.prefix($0)) } ?? lines).map(tokenizer)
}
