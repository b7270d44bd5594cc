import XCTest
@testable import Editing

/// Parity with the official PyTorch DAFNet auxiliary network (fixture dafnet-aux).
final class AuxParityTests: XCTestCase {
    func testMatchesOfficialModules() throws {
        let folder = Bundle.module.resourceURL!.appendingPathComponent("Fixtures/dafnet-aux")
        let report = try AuxReference.check(folder: folder)
        for row in report.rows where !row.passed { XCTFail("\(row.check): \(row.error) > \(row.tolerance)") }
        for prefix in ["step3.delta_weight", "step3.reps.1", "step1.past_update_scale", "grad.", "ebn.mean", "probe_loss"] {
            XCTAssertTrue(report.rows.contains { $0.check.hasPrefix(prefix) }, "no \(prefix) check")
        }
        XCTAssertGreaterThan(report.rows.count, 60)
    }
}
