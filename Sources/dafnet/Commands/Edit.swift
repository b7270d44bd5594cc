import ArgumentParser
import Editing
import Evaluation
import Foundation
import LanguageModel
import Pipeline

struct Edit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply one batch of edits (JSON Lines) to the model through the editor and print what they did.")

    @OptionGroup var model: ModelOption
    @OptionGroup var editorOption: EditorOption
    @Option(help: "Held-out text for perplexity (default: samples/world/heldout_text.txt).")
    var text: String?
    @Flag(help: "Print JSON.")
    var json = false
    /// `--store S [--version V]`: preview the batch on top of that version; nothing is committed.
    @OptionGroup var stored: StoredVersionOptions
    @Option(help: "A one-edit batch without a file: the prompt (with --target).")
    var prompt: String?
    @Option(help: "A one-edit batch without a file: the new target.")
    var target: String?
    @Option(help: "With --prompt: a rephrasing to score generality on (repeatable).")
    var rephrase: [String] = []
    @Option(help: "With --prompt: the subject the fact is about, a part of the prompt (MEMIT and AlphaEdit write at its last token; else at the prompt's).")
    var subject: String?
    @Argument(help: "The batch: one edit per line (prompt, target_new, rephrase_prompt, locality_prompt, …).")
    var batch: String?

    func validate() throws {
        if (batch == nil) == (prompt == nil) { throw ValidationError("give a BATCH file or --prompt P --target T") }
        if (prompt == nil) != (target == nil) { throw ValidationError("--prompt and --target go together") }
    }

    func run() throws {
        let folder = try model.load(requireTokenizer: true)
        let requests: [EditRequest]
        if let batch {
            requests = try runMapped { try EditBatch.read(URL(fileURLWithPath: batch)) }
        } else {
            var line: [String: Any] = ["prompt": prompt!, "target_new": target!]
            if !rephrase.isEmpty { line["rephrase_prompt"] = rephrase }
            if let subject { line["subject"] = subject }
            let data = try JSONSerialization.data(withJSONObject: line) + Data("\n".utf8)
            requests = try runMapped { try EditBatch.parse(data, file: "--prompt") }
        }
        let editor = try runMapped { try EditorRegistry.load(from: editorOption.url, model: folder.model, tokenizer: folder.tokenizer!) }
        let ref = try EditMetrics.localityReference(editor: editor, requests)
        var state = editor.newState()
        var headAnswers: [String]?
        var headLabel = ""
        if let (store, loaded) = try stored.load(for: folder) {
            // Start from the stored version: its answers are the "before" that matters here.
            let hash = PipelineResources.hashes(modelFolder: folder.url, editorFolder: editorOption.url).editor
            state = try runMapped { try VersionReplay.state(of: loaded, in: store, editor: editor, editorSHA256: hash) }
            headLabel = "version \(loaded.manifest.version)"
            headAnswers = try requests.map { r in
                try runMapped { try EditMetrics.greedyAnswer(folder.model, folder.tokenizer!, prompt: r.prompt, maxTokens: 4) }
            }
        }
        let times = try runMapped { try editor.apply(requests, to: state) }
        let text = heldoutText(self.text, tokenizer: { folder.tokenizer!.encode($0) }, limit: 200)
        let ev = try runMapped { try EditMetrics.evaluate(editor: editor, requests, localityReference: ref, heldoutText: text, answers: true) }
        if json { try printJSON(ev); return }
        for (i, e) in ev.edits.enumerated() {
            print("\(i + 1). \(e.prompt) → \(e.targetNew)")
            print(String(format: "   reliability %.2f  generality %@  locality %@", e.reliability,
                         e.generality.map { String(format: "%.2f", $0) } ?? "-", e.locality.map { String(format: "%.2f", $0) } ?? "-"))
            if let headAnswers {
                print("   unedited: \(e.answerBefore ?? "")\n   \(headLabel): \(headAnswers[i])\n   after:  \(e.answerAfter ?? "")")
            } else {
                print("   before: \(e.answerBefore ?? "")\n   after:  \(e.answerAfter ?? "")")
            }
        }
        if let store = stored.store { print("\n(preview on \(headLabel) of \(store): nothing was committed)") }
        print(String(format: "\nmean reliability %.3f  generality %@  locality %@  perplexity %.2f → %.2f", ev.reliability,
                     ev.generality.map { String(format: "%.3f", $0) } ?? "-", ev.locality.map { String(format: "%.3f", $0) } ?? "-",
                     ev.perplexityBefore ?? .nan, ev.perplexityAfter ?? .nan))
        print(String(format: "%d edits in %.1f ms (signal %.1f, auxiliary %.1f, apply %.1f)", requests.count, times.total * 1000,
                     times.signal * 1000, times.auxiliary * 1000, times.apply * 1000))
    }
}
