import Foundation
import Storage

// Configuration files may leave out any key: a missing key keeps its default. Unknown keys are errors
// (`rejectUnknownKeys` and `value(_:_:)` in Storage/SettingsDecoding.swift).

extension AuxNetConfig {
    public init(from decoder: Decoder) throws {
        try rejectUnknownKeys(decoder, CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = AuxNetConfig()
        self.init()
        layerN = try c.value(.layerN, d.layerN); innerAttDim = try c.value(.innerAttDim, d.innerAttDim)
        ffnDim = try c.value(.ffnDim, d.ffnDim); outerAttDim = try c.value(.outerAttDim, d.outerAttDim)
        outerAttHeadN = try c.value(.outerAttHeadN, d.outerAttHeadN); outerScoreAttDim = try c.value(.outerScoreAttDim, d.outerScoreAttDim)
        outerScoreAttHeadN = try c.value(.outerScoreAttHeadN, d.outerScoreAttHeadN); normLayer = try c.value(.normLayer, d.normLayer)
    }
}

extension EditorConfig {
    public init(from decoder: Decoder) throws {
        try rejectUnknownKeys(decoder, CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init()
        method = try c.value(.method, method); modules = try c.value(.modules, modules); editBias = try c.value(.editBias, editBias)
        baseModel = try c.value(.baseModel, baseModel)
        auxModel = try c.value(.auxModel, auxModel); initEditLR = try c.value(.initEditLR, initEditLR); training = try c.value(.training, training)
        accumulation = try c.value(.accumulation, accumulation); lsLambda = try c.value(.lsLambda, lsLambda)
        signalRows = try c.value(.signalRows, signalRows)
        contrastSubjects = try c.value(.contrastSubjects, contrastSubjects); contrastWeight = try c.value(.contrastWeight, contrastWeight)
        guard contrastSubjects >= 0, contrastWeight >= 0 else {
            throw DecodingError.dataCorruptedError(forKey: .contrastSubjects, in: c, debugDescription: "contrast_subjects and contrast_weight must not be negative")
        }
        lsLambdaScale = try c.value(.lsLambdaScale, lsLambdaScale)
        guard lsLambdaScale > 0 && lsLambdaScale.isFinite else {
            throw DecodingError.dataCorruptedError(forKey: .lsLambdaScale, in: c, debugDescription: "ls_lambda_scale must be a positive number")
        }
        routeThreshold = try c.value(.routeThreshold, routeThreshold)
        if let t = routeThreshold, !(t > -1 && t < 1) {
            throw DecodingError.dataCorruptedError(forKey: .routeThreshold, in: c, debugDescription: "route_threshold is a cosine: it must lie in (-1, 1)")
        }
        lsShardEdits = try c.value(.lsShardEdits, lsShardEdits)
        if let n = lsShardEdits, n < 1 {
            throw DecodingError.dataCorruptedError(forKey: .lsShardEdits, in: c, debugDescription: "ls_shard_edits must be at least 1")
        }
    }
}

extension MetaTrainingConfig {
    public init(from decoder: Decoder) throws {
        try rejectUnknownKeys(decoder, CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init()
        steps = try c.value(.steps, steps); seed = try c.value(.seed, seed); auxLR = try c.value(.auxLR, auxLR)
        editLRLR = try c.value(.editLRLR, editLRLR); reliaLambda = try c.value(.reliaLambda, reliaLambda)
        genLambda = try c.value(.genLambda, genLambda); locLambda = try c.value(.locLambda, locLambda); maxSeq = try c.value(.maxSeq, maxSeq)
        growEvery = try c.value(.growEvery, growEvery); growBy = try c.value(.growBy, growBy); gradClip = try c.value(.gradClip, gradClip)
        checkpointEvery = try c.value(.checkpointEvery, checkpointEvery); logEvery = try c.value(.logEvery, logEvery)
        curriculum = try c.value(.curriculum, curriculum); plateauPatience = try c.value(.plateauPatience, plateauPatience)
        plateauDecay = try c.value(.plateauDecay, plateauDecay); lossSample = try c.value(.lossSample, lossSample)
        lsLambdaLR = try c.value(.lsLambdaLR, lsLambdaLR); curriculumStart = try c.value(.curriculumStart, curriculumStart)
        episodesPerStep = try c.value(.episodesPerStep, episodesPerStep)
        guard episodesPerStep >= 1 else {
            throw DecodingError.dataCorruptedError(forKey: .episodesPerStep, in: c, debugDescription: "episodes_per_step must be at least 1")
        }
        guard curriculumStart >= 1 && curriculumStart <= maxSeq else {
            throw DecodingError.dataCorruptedError(forKey: .curriculumStart, in: c, debugDescription: "curriculum_start must be in 1…max_seq (\(maxSeq))")
        }
    }
}

extension MEMITConfig {
    public init(from decoder: Decoder) throws {
        try rejectUnknownKeys(decoder, CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init()
        method = try c.value(.method, method); modules = try c.value(.modules, modules)
        baseModel = try c.value(.baseModel, baseModel); baseModelSHA256 = try c.value(.baseModelSHA256, baseModelSHA256)
        prefixes = try c.value(.prefixes, prefixes); valueSteps = try c.value(.valueSteps, valueSteps); valueLR = try c.value(.valueLR, valueLR)
        valueWeightDecay = try c.value(.valueWeightDecay, valueWeightDecay); clampNormFactor = try c.value(.clampNormFactor, clampNormFactor)
        klFactor = try c.value(.klFactor, klFactor); valueStopLoss = try c.value(.valueStopLoss, valueStopLoss)
        covarianceWeight = try c.value(.covarianceWeight, covarianceWeight); l2 = try c.value(.l2, l2)
        keepEditKeys = try c.value(.keepEditKeys, keepEditKeys); jointSolve = try c.value(.jointSolve, jointSolve)
        nullspaceThreshold = try c.value(.nullspaceThreshold, nullspaceThreshold)
        statisticsTokens = try c.value(.statisticsTokens, statisticsTokens); statisticsText = try c.value(.statisticsText, statisticsText)
    }
}

extension FineTuneConfig {
    public init(from decoder: Decoder) throws {
        try rejectUnknownKeys(decoder, CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init()
        method = try c.value(.method, method); modules = try c.value(.modules, modules); steps = try c.value(.steps, steps)
        learningRate = try c.value(.learningRate, learningRate); targetLoss = try c.value(.targetLoss, targetLoss)
    }
}
