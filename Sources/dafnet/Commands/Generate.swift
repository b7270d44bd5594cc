import ArgumentParser
import Evaluation
import Foundation
import LanguageModel

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Greedy continuation of PROMPT (key/value cache).")

    @OptionGroup var model: ModelOption
    @OptionGroup var stored: StoredVersionOptions
    @OptionGroup var editorOption: EditorOption
    @Option(help: "Number of new tokens.")
    var maxTokens = 16
    @Flag(help: "Print the ids as JSON instead of text.")
    var ids = false
    @Option(help: "A JSON Lines file of prompts ({\"prompt\": …} per line, or plain text lines): one JSON answer per line out.")
    var prompts: String?
    @Argument(help: "The prompt.")
    var prompt: String?

    func validate() throws {
        if maxTokens < 1 { throw ValidationError("--max-tokens must be at least 1") }
        if (prompt == nil) == (prompts == nil) { throw ValidationError("give a PROMPT or --prompts FILE") }
    }

    func run() throws {
        let folder = try model.load(requireTokenizer: true)
        try stored.install(on: folder, editor: editorOption.url)
        let tok = folder.tokenizer!
        func answer(_ text: String) throws -> [Int] {
            let promptIds = tok.encode(text)
            if promptIds.isEmpty { throw ValidationError("the prompt has no tokens") }
            return try runMapped { try EditMetrics.greedyAnswerTokens(folder.model, tok, promptIds: [promptIds], maxTokens: maxTokens)[0] }
        }
        if let prompt {
            let out = try answer(prompt)
            if ids { try printJSON(out) } else { print(prompt + tok.decode(out)) }
            return
        }
        let text = try runMapped { try String(contentsOfFile: prompts!, encoding: .utf8) }
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty { continue }
            var p = line
            if line.hasPrefix("{") {
                guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], let s = o["prompt"] as? String else {
                    printError("error: \(prompts!):\(i + 1): field \"prompt\": a JSON line needs a string prompt")
                    throw ExitCode(ExitStatus.failure)
                }
                p = s
            }
            let out = try answer(p)
            struct Answer: Encodable { var prompt: String; var answer: String; var ids: [Int] }
            print(String(decoding: try enc.encode(Answer(prompt: p, answer: tok.decode(out), ids: out)), as: UTF8.self))
        }
    }
}
