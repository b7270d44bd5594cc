import ArgumentParser
import Foundation
import World

struct WorldCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "world", abstract: "The sample model's world of facts.", subcommands: [WorldBuild.self])
}

struct WorldBuild: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "build",
        abstract: "Pick CounterFact facts into the DAFSet splits with their pre-training counts (facts.jsonl, heldout_text.txt).")

    @Option(help: "Folder with CounterFact train.jsonl and eval.jsonl.")
    var counterfact = "../shared/data/counterfact"
    @Option(help: "Output folder.")
    var out = "world"
    @Option(help: "World options (JSON); default: the built-in sizes.")
    var options: String?

    func run() throws {
        let opts: WorldOptions = try options.map { try JSONDecoder().decode(WorldOptions.self, from: Data(contentsOf: URL(fileURLWithPath: $0))) } ?? WorldOptions()
        let src = URL(fileURLWithPath: counterfact)
        let world = try runMapped {
            try WorldBuilder.build(train: src.appendingPathComponent("train.jsonl"), eval: src.appendingPathComponent("eval.jsonl"), options: opts)
        }
        let dir = URL(fileURLWithPath: out)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try runMapped {
            try FactFile.write(world.facts, to: dir.appendingPathComponent("facts.jsonl"))
            try (world.perplexityText.joined(separator: "\n") + "\n").write(to: dir.appendingPathComponent("heldout_text.txt"), atomically: true, encoding: .utf8)
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            try enc.encode(opts).write(to: dir.appendingPathComponent("world.json"))
        }
        var counts: [String: (Int, Int)] = [:]
        for f in world.facts { counts[f.split, default: (0, 0)].0 += 1; counts[f.split, default: (0, 0)].1 += f.occurrences }
        for s in Fact.splits { print("\(s): \(counts[s]?.0 ?? 0) facts, \(counts[s]?.1 ?? 0) occurrences") }
        print("heldout text: \(world.perplexityText.count) sentences")
    }
}
