import ArgumentParser

@main
struct Dafnet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dafnet",
        abstract: "Keep a language model's facts up to date with DAFNet sequential editing.",
        subcommands: [
            VersionCommand.self,
            Bench.self,
            Tokenize.self,
            Generate.self,
            CheckReference.self,
            WorldCommand.self,
            Pretrain.self,
            Facts.self,
            DAFSetCommand.self,
            TrainEditor.self,
            EditorCommand.self,
            Edit.self,
            Export.self,
            TokenizerCommand.self,
            Checkpoints.self,
            Rollback.self,
            Archive.self,
            Watch.self, Report.self,
            // Add one line per subcommand (one file per subcommand under Commands/).
        ]
    )
}

/// `dafnet bench …`: benchmarks. Each benchmark is its own subcommand file.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure speed: kernels, language models, edits, the store.",
        subcommands: [
            BenchKernels.self,
            BenchLM.self,
            BenchEdits.self,
            BenchEditor.self,
            BenchStore.self,
            BenchPipeline.self,
        ]
    )
}

/// `dafnet version`: the tool's version. (A root `--version` flag would be repeated in every
/// subcommand's help beside the `--version V` of the store commands.)
struct VersionCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "version", abstract: "Print dafnet's version.")
    static let number = "0.1.0"
    func run() { print(Self.number) }
}
