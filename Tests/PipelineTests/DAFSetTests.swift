import Editing
import Evaluation
import Foundation
import LanguageModel
import XCTest

/// DAFSet from any CounterFact/ZsRE-layout edits and any model.
final class DAFSetTests: XCTestCase {
    func testBuildFromEditsSplitsBySubjectAndMarksLongTailByLikelihood() throws {
        let f = try ModelFolder.load(Fixture.modelFolder, requireTokenizer: true)
        let subjects = (0..<40).map { "Subject \($0)" }
        var edits = subjects.flatMap { s in
            ["The mother tongue of \(s) is", "\(s) was born in"].enumerated().map { k, p in
                EditRequest(prompt: p, targetNew: k == 0 ? "French" : "Paris", subject: s, groundTruth: k == 0 ? "English" : "London",
                            rephrases: ["\(s) speaks"], caseId: "\(s)-\(k)", extra: ["note": .string("kept")])
            }
        }
        // ZsRE layout, read through the batch parser's aliases.
        let zsre = #"{"src": "What is the capital of Subject 0?", "alt": "Lyon", "subject": "Subject 0", "rephrase": "Which city is Subject 0's capital?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}"#
        edits += try EditBatch.parse(Data((zsre + "\n").utf8), file: "zsre.jsonl")
        let sets = try DAFSet.build(edits: edits, model: f.model, tokenizer: f.tokenizer, evalShare: 0.25)
        XCTAssertEqual(sets.train.count + sets.eval.count, edits.count)
        XCTAssertFalse(sets.eval.isEmpty); XCTAssertFalse(sets.train.isEmpty)
        let trainSubjects = Set(sets.train.map { $0["subject"] as! String }), evalSubjects = Set(sets.eval.map { $0["subject"] as! String })
        XCTAssertTrue(trainSubjects.isDisjoint(with: evalSubjects), "no subject in both")
        let all = sets.train + sets.eval
        let scored = all.filter { $0["model_nll"] != nil }
        XCTAssertEqual(scored.count, edits.count - 1, "every edit with a ground truth gets the model's likelihood")
        let longTail = scored.filter { $0["long_tail_by_likelihood"] as! Bool }
        XCTAssertEqual(longTail.count, scored.count - Int(Double(scored.count) * 0.75))
        let minLong = longTail.map { $0["model_nll"] as! Double }.min()!
        XCTAssertTrue(scored.filter { !($0["long_tail_by_likelihood"] as! Bool) }.allSatisfy { ($0["model_nll"] as! Double) <= minLong })
        XCTAssertTrue(all.allSatisfy { ["popular", "long_tail", "robust"].contains($0["property"] as! String) })
        let robust = all.filter { $0["property"] as! String == "robust" }
        XCTAssertFalse(robust.isEmpty)
        for r in robust { XCTAssertGreaterThanOrEqual((r["rephrase_prompt"] as! [String]).count, 3) }
        XCTAssertTrue(all.contains { $0["note"] as? String == "kept" }, "unknown fields are kept")
        // The written file reads back as edits.
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("dafset-\(UUID().uuidString).jsonl")
        defer { try? FileManager.default.removeItem(at: url) }
        try DAFSet.write(sets.train, to: url)
        XCTAssertEqual(try EditBatch.read(url).count, sets.train.count)
        // The same input gives the same sets.
        let again = try DAFSet.build(edits: edits, model: f.model, tokenizer: f.tokenizer, evalShare: 0.25)
        XCTAssertEqual(again.eval.map { $0["case_id"] as? String }, sets.eval.map { $0["case_id"] as? String })
    }
}
