import ArgumentParser
import Foundation
import LanguageModel

struct BenchLM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lm",
        abstract: "Language-model tokens/s (forward; forward+backward), GFLOP/s and share of the matmul peak.")

    @Option(help: "A model folder (default: samples/model unless --preset is given).")
    var model: String?
    @Option(help: "Random weights of a preset shape instead of a folder: gpt2-small (768×12) or small (256×4).")
    var preset: String?
    @Option(help: "Sequences per batch.")
    var batch = 4
    @Option(help: "Tokens per sequence.")
    var seq = 128
    @Option(help: "Seconds to time each measurement.")
    var seconds = 3.0
    @Flag(help: "Print JSON.")
    var json = false

    func validate() throws {
        if batch < 1 || seq < 1 { throw ValidationError("--batch and --seq must be positive") }
        if let preset, LMBenchmark.preset(preset) == nil { throw ValidationError("unknown --preset \(preset) (gpt2-small, small)") }
        if preset != nil && model != nil { throw ValidationError("give --model or --preset, not both") }
    }

    func run() throws {
        let lm: TransformerLM
        let name: String
        if let preset {
            lm = TransformerLM(spec: LMBenchmark.preset(preset)!)
            lm.initialise(seed: 1)
            name = preset
        } else {
            let url = model.map { URL(fileURLWithPath: $0) } ?? Embedded.model
            lm = try runMapped { try ModelFolder.load(url) }.model
            name = url.lastPathComponent
        }
        if seq > lm.spec.maxPositions { throw ValidationError("--seq \(seq) exceeds the model's \(lm.spec.maxPositions) positions") }
        let r = LMBenchmark.run(model: lm, name: name, B: batch, T: seq, seconds: seconds)
        if json { try printJSON(r); return }
        print("model \(r.model): \(r.parameters) parameters, batch \(r.batch) × \(r.seq) tokens")
        print(String(format: "forward:          %9.0f tokens/s  %7.1f GFLOP/s", r.forwardTokensPerS, r.forwardGflops))
        print(String(format: "forward+backward: %9.0f tokens/s  %7.1f GFLOP/s  (%.0f%% of the measured %.0f GFLOP/s sgemm peak)",
                     r.trainTokensPerS, r.gflops, r.peakShare * 100, r.peakGflops))
    }
}
