import ArgumentParser
import Editing
import Evaluation
import Foundation
import LanguageModel

struct Edit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply one batch of edits (JSON Lines) to the model through the editor and print what they did.")

    @OptionGroup var model: ModelOption
    @OptionGroup var editorOption: EditorOption
    @Option(help: "Held-out text for perplexity (default: samples/world/heldout_text.txt).")
    var text: String?
    @Flag(help: "Print JSON.")
    var json = false
    @Argument(help: "The batch: one edit per line (prompt, target_new, rephrase_prompt, locality_prompt, …).")
    var batch: String

    func run() throws {
        let folder = try model.load(requireTokenizer: true)
        let requests = try runMapped { try EditBatch.read(URL(fileURLWithPath: batch)) }
        let editor = try runMapped { try DAFNetEditor.load(from: editorOption.url, model: folder.model, tokenizer: folder.tokenizer!) }
        let ref = EditMetrics.localityReference(editor: editor, requests)
        let state = EditState(moduleNames: editor.config.modules)
        let times = try runMapped { try editor.apply(requests, to: state) }
        let text = heldoutText(self.text, tokenizer: { folder.tokenizer!.encode($0) }, limit: 200)
        let ev = try runMapped { try EditMetrics.evaluate(editor: editor, requests, localityReference: ref, heldoutText: text, answers: true) }
        if json { try printJSON(ev); return }
        for (i, e) in ev.edits.enumerated() {
            print("\(i + 1). \(e.prompt) → \(e.targetNew)")
            print(String(format: "   reliability %.2f  generality %@  locality %@", e.reliability,
                         e.generality.map { String(format: "%.2f", $0) } ?? "-", e.locality.map { String(format: "%.2f", $0) } ?? "-"))
            print("   before: \(e.answerBefore ?? "")\n   after:  \(e.answerAfter ?? "")")
        }
        print(String(format: "\nmean reliability %.3f  generality %@  locality %@  perplexity %.2f → %.2f", ev.reliability,
                     ev.generality.map { String(format: "%.3f", $0) } ?? "-", ev.locality.map { String(format: "%.3f", $0) } ?? "-",
                     ev.perplexityBefore ?? .nan, ev.perplexityAfter ?? .nan))
        print(String(format: "%d edits in %.1f ms (signal %.1f, auxiliary %.1f, apply %.1f)", requests.count, times.total * 1000,
                     times.signal * 1000, times.auxiliary * 1000, times.apply * 1000))
    }
}
