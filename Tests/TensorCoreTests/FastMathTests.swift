import Foundation
import XCTest
@testable import TensorCore

final class FastMathTests: XCTestCase {
    func testExpRelativeErrorOverTheRange() {
        var worst = 0.0
        var x: Float = -87
        while x < 88 {
            let got = Double(FastMath.exp(x)), ref = Foundation.exp(Double(x))
            worst = max(worst, abs(got - ref) / ref)
            x += 0.0137
        }
        XCTAssertLessThan(worst, 3e-7)  // about two float32 ulps
        XCTAssertEqual(FastMath.exp(-200), 0)
        XCTAssertEqual(FastMath.exp(200), .infinity)
        XCTAssertEqual(FastMath.exp(0), 1)
    }

    func testTanhAndTails() {
        var worst: Float = 0
        for i in -2000...2000 {
            let y = Float(i) / 100
            worst = max(worst, abs(FastMath.tanh(.init(repeating: y))[0] - Float(Foundation.tanh(Double(y)))))
        }
        XCTAssertLessThan(worst, 3e-7)
        let inp: [Float] = (0..<13).map { Float($0) / 3 - 2 }
        var out = [Float](repeating: 0, count: 13)
        FastMath.map(&out, inp, count: 13) { FastMath.exp($0) }
        for (a, b) in zip(out, inp) { XCTAssertEqual(Double(a), Foundation.exp(Double(b)), accuracy: 1e-6 * Foundation.exp(Double(b))) }
    }
}
