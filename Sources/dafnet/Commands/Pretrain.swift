import ArgumentParser
import Foundation
import LanguageModel
import World

struct Pretrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pre-train the sample model on the world's corpus (resumable; progress on stderr, log in the run folder).")

    @Option(help: "Run configuration (JSON), e.g. samples/pretrain.json.")
    var config: String

    func run() throws {
        let cfg = try runMapped { try JSONDecoder().decode(PretrainConfig.self, from: Data(contentsOf: URL(fileURLWithPath: config))) }
        let facts = try runMapped { try FactFile.read(URL(fileURLWithPath: cfg.world)) }
        let sentences = CorpusBuilder.sentences(facts: facts, seed: cfg.seed)
        let trainer = Pretrainer(config: cfg, runDir: URL(fileURLWithPath: cfg.runDir))
        trainer.progress = { line in FileHandle.standardError.write(Data(("\r\u{1B}[K" + line).utf8)) }
        printError("corpus: \(sentences.count) sentences from \(facts.count) facts; log: \(trainer.logURL.path)")
        try runMapped { try trainer.run(sentences: sentences, out: URL(fileURLWithPath: cfg.out)) }
        printError("\nwrote \(cfg.out)")
    }
}
