import XCTest
@testable import TensorCore

final class SegmentOpTests: XCTestCase {
    let gc = GradCheck()
    let lengths = [3, 1, 2]

    func testSegmentSoftmaxSumAndRepeatGradients() {
        var rng = RNG(seed: 40)
        let s = randn([6, 1], &rng), x = randn([6, 4], &rng), r = randn([3, 4], &rng)
        gc.checkTape("segmentSoftmax", inputs: [s]) { t, v in t.segmentSoftmax(v[0], lengths: self.lengths) }
        gc.checkTape("segmentSum", inputs: [x]) { t, v in t.segmentSum(v[0], lengths: self.lengths) }
        gc.checkTape("repeatSegments", inputs: [r]) { t, v in t.repeatSegments(v[0], lengths: self.lengths) }
        // Attention pooling as DAFNet's intra-edit attention builds it.
        gc.checkTape("pool", inputs: [x, s]) { t, v in
            t.segmentSum(t.rowScale(v[0], t.segmentSoftmax(v[1], lengths: self.lengths)), lengths: self.lengths)
        }
    }

    func testSegmentSoftmaxSumsToOnePerSegment() {
        let tape = Tape()
        let w = tape.segmentSoftmax(tape.leaf(Tensor(shape: [6], values: [1, 2, 3, 9, -1, 4])), lengths: lengths)
        XCTAssertEqual(w.value[0] + w.value[1] + w.value[2], 1, accuracy: 1e-6)
        XCTAssertEqual(w.value[3], 1, accuracy: 1e-6)
        XCTAssertEqual(w.value[4] + w.value[5], 1, accuracy: 1e-6)
    }
}
