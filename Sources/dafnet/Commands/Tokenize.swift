import ArgumentParser
import Foundation
import LanguageModel

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the token ids of TEXT as JSON.")

    @OptionGroup var model: ModelOption
    @Flag(help: "Do not add the tokenizer's special tokens (e.g. Llama's <s>).")
    var noSpecialTokens = false
    @Argument(help: "The text to tokenize.")
    var text: String

    func run() throws {
        let folder = try model.load(requireTokenizer: true)
        try printJSON(folder.tokenizer!.encode(text, addSpecialTokens: !noSpecialTokens))
    }
}
