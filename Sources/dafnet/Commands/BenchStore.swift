import ArgumentParser
import Foundation
import Storage

/// `dafnet bench store`: checkpoint-store throughput and compression ratio.
struct BenchStore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "store",
        abstract: "Write/read throughput and compression ratio of the checkpoint store (zstd levels × shuffle).")

    @Flag(help: "Print JSON.") var json = false
    @Option(help: "Runs per configuration (the median is reported).") var repeats = 5
    @Option(parsing: .upToNextOption, help: "zstd levels to measure.") var levels: [Int32] = [1, 3, 9]
    @Option(help: "Folder for the scratch stores (default: the system temporary folder).") var directory: String?
    @Option(help: "Outer products summed into each synthetic ΔW.") var rank = 8
    @Option(help: "Noise added to each ΔW, relative to its largest value.") var noise: Float = 0.01

    func validate() throws {
        guard repeats >= 1 else { throw ValidationError("--repeats must be at least 1") }
        guard levels.allSatisfy({ (1...19).contains($0) }) else { throw ValidationError("levels run from 1 to 19") }
        guard rank >= 1, noise >= 0 else { throw ValidationError("--rank must be at least 1 and --noise not negative") }
    }

    func run() throws {
        try runMapped {
            let state = StoreBenchmark.syntheticEditState(rank: rank, noise: noise)
            let results = try StoreBenchmark.run(tensors: state, levels: levels, repeats: repeats,
                                                 directory: directory.map { URL(fileURLWithPath: $0) })
            if json {
                print(try StoreText.json(results))
            } else {
                print("edit state: \(state.count) tensors (3 blocks × c_fc/c_proj ΔW [256,1024]/[1024,256] and Δb; "
                    + "rank \(rank) + \(noise * 100)% noise)")
                print(StoreBenchmark.table(results))
            }
        }
    }
}
