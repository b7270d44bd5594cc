import ArgumentParser
import Foundation
import Tokenizers

/// `dafnet tokenizer …`: tokenizer tools.
struct TokenizerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tokenizer",
        abstract: "Tokenizer tools.",
        subcommands: [TokenizerTrain.self]
    )
}

/// `dafnet tokenizer train`: byte-level BPE (GPT-2 style) from a text corpus, written as a
/// Hugging Face tokenizer.json + tokenizer_config.json.
struct TokenizerTrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Train a byte-level BPE tokenizer (GPT-2 style) on a UTF-8 text file.",
        discussion: """
            Writes DIR/tokenizer.json and DIR/tokenizer_config.json, loadable by Hugging Face \
            `tokenizers`/`transformers`. Special tokens get ids 0, 1, … in the order given; the first \
            is also the bos, eos and unk token.
            """
    )

    @Option(help: "The training text (UTF-8).")
    var corpus: String

    @Option(help: "Target vocabulary size, special tokens and the 256 byte symbols included.")
    var vocab: Int

    @Option(help: "Output folder (created if needed).")
    var out: String

    @Option(help: "Pairs seen fewer times are not merged (0 merges every pair, as Hugging Face's default).")
    var minFrequency: Int = 0

    @Option(parsing: .upToNextOption, help: "Special tokens (default: <|endoftext|>).")
    var special: [String] = []

    @Option(help: "model_max_length written to tokenizer_config.json.")
    var modelMaxLength: Int = 1024

    func validate() throws {
        guard vocab > 0 else { throw ValidationError("--vocab must be positive") }
        guard minFrequency >= 0 else { throw ValidationError("--min-frequency must not be negative") }
        guard modelMaxLength > 0 else { throw ValidationError("--model-max-length must be positive") }
        guard !special.contains(where: \.isEmpty) else { throw ValidationError("--special tokens must not be empty") }
    }

    func run() throws {
        let options = BPETrainingOptions(
            vocabSize: vocab, minFrequency: minFrequency,
            specialTokens: special.isEmpty ? ["<|endoftext|>"] : special, modelMaxLength: modelMaxLength)
        let trained = try runMapped {
            let trained = try BPETrainer.train(corpus: URL(fileURLWithPath: corpus), options: options)
            try trained.write(to: URL(fileURLWithPath: out))
            return trained
        }
        print(String(format: "trained on %d bytes (%d distinct words): vocabulary %d, merges %d, %.2f s",
                     trained.corpusBytes, trained.distinctWords, trained.vocabulary.count,
                     trained.merges.count, trained.seconds))
        if trained.vocabulary.count < vocab {
            print("note: no pair left to merge (or below --min-frequency) before reaching --vocab \(vocab)")
        }
        print("wrote \(out)/tokenizer.json and \(out)/tokenizer_config.json")
    }
}
