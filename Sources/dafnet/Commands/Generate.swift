import ArgumentParser
import Foundation
import LanguageModel

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Greedy continuation of PROMPT (key/value cache).")

    @OptionGroup var model: ModelOption
    @Option(help: "Number of new tokens.")
    var maxTokens = 16
    @Flag(help: "Print the ids as JSON instead of text.")
    var ids = false
    @Argument(help: "The prompt.")
    var prompt: String

    func validate() throws {
        if maxTokens < 1 { throw ValidationError("--max-tokens must be at least 1") }
    }

    func run() throws {
        let folder = try model.load(requireTokenizer: true)
        let tok = folder.tokenizer!
        let promptIds = tok.encode(prompt)
        if promptIds.isEmpty { throw ValidationError("the prompt has no tokens") }
        let out = try runMapped {
            try folder.model.generateGreedy(prompt: promptIds, maxNewTokens: maxTokens, stop: tok.eosTokenID)
        }
        if ids { try printJSON(out) } else { print(prompt + tok.decode(Array(out[promptIds.count...]))) }
    }
}
