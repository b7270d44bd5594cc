import ArgumentParser
import Distributed
import Editing
import Foundation
import LanguageModel
import World

struct Pretrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pre-train the sample model on the world's corpus (resumable; progress on stderr, log in the run folder).")

    @Option(help: "Run configuration (JSON), e.g. samples/pretrain.json.")
    var config: String
    @Option(help: "Stop (checkpointed, no model folder) after this step; rerun to resume.")
    var stopAfter: Int?

    func run() throws {
        let comm = try startJob()
        try inJob(comm) { try train(comm) }
    }

    /// Every rank of an MPI job runs this; rank 0 alone prints and writes.
    func train(_ comm: Communicator) throws {
        let cfg = try runMapped { try EditorRegistry.readConfig(PretrainConfig.self, file: URL(fileURLWithPath: config)) }
        let facts = try runMapped { try FactFile.read(URL(fileURLWithPath: cfg.world)) }
        let sentences = CorpusBuilder.sentences(facts: facts, seed: cfg.seed)
        let trainer = Pretrainer(config: cfg, runDir: URL(fileURLWithPath: cfg.runDir), communicator: comm)
        trainer.progress = { comm.progress($0) }
        comm.say("corpus: \(sentences.count) sentences from \(facts.count) facts; log: \(trainer.logURL.path)")
        try runMapped { try trainer.run(sentences: sentences, out: URL(fileURLWithPath: cfg.out), stopAfter: stopAfter) }
        comm.say(stopAfter.map { "\nstopped at step \($0) (checkpoint in \(cfg.runDir)); run the same command again to resume" } ?? "\nwrote \(cfg.out)")
    }
}
