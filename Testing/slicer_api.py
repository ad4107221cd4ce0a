"""The Slicer calls the module (MultiTaskSeg.py, MultiTaskSegShell/) and the MRML adapter
(MultiTaskSegMRML/) make, with the Slicer source line that defines each.

Why this list: the module must run on Slicer 5.8 to today's main, and it cannot be installed
here. test_slicer_module_static.py checks that every Slicer call in that code is listed here,
that none of the calls new in Slicer 5.10+ is made, and that every listed class method exists in
slicer-core (5.13). Where "pre-5.10" is noted, the declaration was read in a stored copy of
Slicer/Slicer that predates 5.10 (it has no vtkSegment::SetTerminology); present there and in
5.13 means present in 5.8. The others are long-standing MRML API (Slicer 4.x) checked in 5.13.

Format: name → (Slicer source file, the defining line, note).
"""
from __future__ import annotations

SEG = "Libs/vtkSegmentationCore/"
MRML = "Libs/MRML/Core/"
SEGLOGIC = "Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.h"
TERM = "Modules/Loadable/Terminologies/Logic/"
UTIL = "Base/Python/slicer/util.py"

# class-level calls: method → (class in slicer-core to check, file, defining line, note)
METHODS: dict[str, tuple[str, str, str, str]] = {
    # segments and segmentations
    "GetTerminologyEntryTagName": ("vtkSegment", SEG + "vtkSegment.h",
                                   "static const char* GetTerminologyEntryTagName();", "pre-5.10; used as SlicerTotalSegmentator does"),
    "SetTag": ("vtkSegment", SEG + "vtkSegment.h", "void SetTag(std::string tag, std::string value);", "pre-5.10"),
    "GetTag": ("vtkSegment", SEG + "vtkSegment.h", "bool GetTag(std::string tag, std::string &value);", "pre-5.10"),
    "GetLabelValue": ("vtkSegment", SEG + "vtkSegment.h", "vtkGetMacro(LabelValue, int);", "pre-5.10"),
    "SetName": ("vtkSegment", SEG + "vtkSegment.h", "vtkSetStringMacro(Name);", "pre-5.10"),
    "GetName": ("vtkSegment", SEG + "vtkSegment.h", "vtkGetStringMacro(Name);", "pre-5.10"),
    "SetColor": ("vtkSegment", SEG + "vtkSegment.h", "vtkSetVector3Macro(Color, double);", "pre-5.10"),
    "AddEmptySegment": ("vtkSegmentation", SEG + "vtkSegmentation.h",
                        'std::string AddEmptySegment(std::string segmentId="", std::string segmentName="", double color[3]=nullptr);',
                        "pre-5.10"),
    "RemoveAllSegments": ("vtkSegmentation", SEG + "vtkSegmentation.h", "void RemoveAllSegments();", ""),
    "RemoveSegment": ("vtkSegmentation", SEG + "vtkSegmentation.h", "void RemoveSegment(std::string segmentId);", ""),
    "GetSegment": ("vtkSegmentation", SEG + "vtkSegmentation.h", "vtkSegment* GetSegment(std::string segmentId);", ""),
    "GetSegmentIDs": ("vtkSegmentation", SEG + "vtkSegmentation.h", "void GetSegmentIDs(std::vector<std::string> &segmentIds);", ""),
    "GetNthSegment": ("vtkSegmentation", SEG + "vtkSegmentation.h", "vtkSegment* GetNthSegment(unsigned int index) const;", ""),
    "GetNumberOfSegments": ("vtkSegmentation", SEG + "vtkSegmentation.h", "int GetNumberOfSegments() const;", ""),
    "SetSegmentIndex": ("vtkSegmentation", SEG + "vtkSegmentation.h", "bool SetSegmentIndex(const std::string& segmentId, unsigned int newIndex);", ""),
    "SetImageToWorldMatrix": ("vtkOrientedImageData", SEG + "vtkOrientedImageData.h", "void SetImageToWorldMatrix(vtkMatrix4x4* matrix);", ""),
    "GetSegmentation": ("vtkMRMLSegmentationNode", "Libs/MRML/Core/vtkMRMLSegmentationNode.h", "vtkGetObjectMacro(Segmentation, vtkSegmentation);", ""),
    "SetReferenceImageGeometryParameterFromVolumeNode": (
        "vtkMRMLSegmentationNode", "Libs/MRML/Core/vtkMRMLSegmentationNode.h",
        "virtual void SetReferenceImageGeometryParameterFromVolumeNode(vtkMRMLScalarVolumeNode* volumeNode);", ""),
    "ImportLabelmapToSegmentationNode": ("vtkSlicerSegmentationsModuleLogic", SEGLOGIC,
                                         "static bool ImportLabelmapToSegmentationNode(vtkOrientedImageData* labelmapImage,",
                                         "pre-5.10"),
    # terminology
    "SetTerminologyContextName": ("vtkSlicerTerminologyEntry", TERM + "vtkSlicerTerminologyEntry.h", "vtkSetStringMacro(TerminologyContextName);", ""),
    "GetCategoryObject": ("vtkSlicerTerminologyEntry", TERM + "vtkSlicerTerminologyEntry.h", "vtkGetObjectMacro(CategoryObject, vtkSlicerTerminologyCategory);", ""),
    "GetTypeObject": ("vtkSlicerTerminologyEntry", TERM + "vtkSlicerTerminologyEntry.h", "vtkGetObjectMacro(TypeObject, vtkSlicerTerminologyType);", ""),
    "GetTypeModifierObject": ("vtkSlicerTerminologyEntry", TERM + "vtkSlicerTerminologyEntry.h", "vtkGetObjectMacro(TypeModifierObject, vtkSlicerTerminologyType);", ""),
    "SetCodingSchemeDesignator": ("vtkSlicerTerminologyType", TERM + "vtkSlicerCodedEntry.h", "vtkSetStringMacro(CodingSchemeDesignator);", ""),
    "SetCodeValue": ("vtkSlicerTerminologyType", TERM + "vtkSlicerCodedEntry.h", "vtkSetStringMacro(CodeValue);", ""),
    "SetCodeMeaning": ("vtkSlicerTerminologyType", TERM + "vtkSlicerCodedEntry.h", "vtkSetStringMacro(CodeMeaning);", ""),
    "SerializeTerminologyEntry": ("vtkSlicerTerminologiesModuleLogic", TERM + "vtkSlicerTerminologiesModuleLogic.h",
                                  "static std::string SerializeTerminologyEntry(vtkSlicerTerminologyEntry* entry);", ""),
    # scene and nodes
    "AddNewNodeByClass": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "vtkMRMLNode* AddNewNodeByClass(std::string className, std::string nodeBaseName = \"\");", ""),
    "AddNode": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "vtkMRMLNode* AddNode(vtkMRMLNode* nodeToAdd);", ""),
    "RemoveNode": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "void RemoveNode(vtkMRMLNode* n);", ""),
    "GetNumberOfNodesByClass": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "int GetNumberOfNodesByClass(const char* className);", ""),
    "GetNthNodeByClass": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "vtkMRMLNode* GetNthNodeByClass(int n, const char* className);", ""),
    "GetNthNode": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "vtkMRMLNode* GetNthNode(int n);", ""),
    "GetNumberOfNodes": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "int GetNumberOfNodes();", ""),
    "GetFirstNodeByClass": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "vtkMRMLNode* GetFirstNodeByClass(const char* className);", ""),
    "Clear": ("vtkMRMLScene", MRML + "vtkMRMLScene.h", "void Clear(int removeSingletons=0);", ""),
    "GetID": ("vtkMRMLNode", MRML + "vtkMRMLNode.h", "vtkGetStringMacro(ID);", ""),
    "IsA": ("vtkMRMLNode", "VTK: vtkObjectBase.h", "virtual vtkTypeBool IsA(const char* name);", ""),
    "SetAttribute": ("vtkMRMLNode", MRML + "vtkMRMLNode.h", "void SetAttribute(const char* name, const char* value);", ""),
    "GetAttribute": ("vtkMRMLNode", MRML + "vtkMRMLNode.h", "const char* GetAttribute(const char* name);", ""),
    "StartModify": ("vtkMRMLNode", MRML + "vtkMRMLNode.h", "virtual int StartModify()", ""),
    "EndModify": ("vtkMRMLNode", MRML + "vtkMRMLNode.h", "virtual int EndModify(int previousDisableModifiedEventState)", ""),
    "SetHideFromEditors": ("vtkMRMLNode", MRML + "vtkMRMLNode.h", "vtkSetMacro(HideFromEditors, int);", ""),
    "CreateDefaultDisplayNodes": ("vtkMRMLDisplayableNode", MRML + "vtkMRMLDisplayableNode.h", "virtual void CreateDefaultDisplayNodes();", ""),
    "GetDisplayNode": ("vtkMRMLDisplayableNode", MRML + "vtkMRMLDisplayableNode.h", "virtual vtkMRMLDisplayNode* GetDisplayNode();", ""),
    "SetAndObserveTransformNodeID": ("vtkMRMLTransformableNode", MRML + "vtkMRMLTransformableNode.h", "virtual bool SetAndObserveTransformNodeID(const char* transformNodeID);", ""),
    "GetTransformNodeID": ("vtkMRMLTransformableNode", MRML + "vtkMRMLTransformableNode.h", "const char* GetTransformNodeID();", ""),
    "GetIJKToRASMatrix": ("vtkMRMLVolumeNode", MRML + "vtkMRMLVolumeNode.h", "virtual void GetIJKToRASMatrix(vtkMatrix4x4* mat);", ""),
    "SetIJKToRASMatrix": ("vtkMRMLVolumeNode", MRML + "vtkMRMLVolumeNode.h", "virtual void SetIJKToRASMatrix(vtkMatrix4x4* mat);", ""),
    "GetImageData": ("vtkMRMLVolumeNode", MRML + "vtkMRMLVolumeNode.h", "virtual vtkImageData* GetImageData();", ""),
    "SetAndObserveImageData": ("vtkMRMLVolumeNode", MRML + "vtkMRMLVolumeNode.h", "virtual void SetAndObserveImageData(vtkImageData* ImageData);", ""),
    "SetAndObserveColorNodeID": ("vtkMRMLDisplayNode", MRML + "vtkMRMLDisplayNode.h", "virtual void SetAndObserveColorNodeID(const char* ColorNodeID);", ""),
    "SetVisibility": ("vtkMRMLDisplayNode", MRML + "vtkMRMLDisplayNode.h", "vtkSetMacro(Visibility, int);", ""),
    "AutoWindowLevelOff": ("vtkMRMLScalarVolumeDisplayNode", MRML + "vtkMRMLScalarVolumeDisplayNode.h", "vtkBooleanMacro(AutoWindowLevel, int);", ""),
    "SetWindowLevelMinMax": ("vtkMRMLScalarVolumeDisplayNode", MRML + "vtkMRMLScalarVolumeDisplayNode.h", "void SetWindowLevelMinMax(double min, double max);", ""),
    "SetTypeToUser": ("vtkMRMLColorTableNode", MRML + "vtkMRMLColorTableNode.h", "void SetTypeToUser();", ""),
    "SetNumberOfColors": ("vtkMRMLColorTableNode", MRML + "vtkMRMLColorTableNode.h", "virtual void SetNumberOfColors(int n);", ""),
    "GetLookupTable": ("vtkMRMLColorTableNode", MRML + "vtkMRMLColorTableNode.h", "vtkLookupTable* GetLookupTable() override;", ""),
    "SetBackgroundVolumeID": ("vtkMRMLSliceCompositeNode", MRML + "vtkMRMLSliceCompositeNode.h", "void SetBackgroundVolumeID(const char* id);", ""),
    "SetForegroundVolumeID": ("vtkMRMLSliceCompositeNode", MRML + "vtkMRMLSliceCompositeNode.h", "void SetForegroundVolumeID(const char* id);", ""),
    "GetForegroundVolumeID": ("vtkMRMLSliceCompositeNode", MRML + "vtkMRMLSliceCompositeNode.h", "vtkGetStringMacro(ForegroundVolumeID);", ""),
    "SetForegroundOpacity": ("vtkMRMLSliceCompositeNode", MRML + "vtkMRMLSliceCompositeNode.h", "void SetForegroundOpacity(double value);", ""),
    "GetSubjectHierarchyNode": ("vtkMRMLSubjectHierarchyNode", MRML + "vtkMRMLSubjectHierarchyNode.h", "static vtkMRMLSubjectHierarchyNode* GetSubjectHierarchyNode(vtkMRMLScene* scene);", ""),
    "GetItemByDataNode": ("vtkMRMLSubjectHierarchyNode", MRML + "vtkMRMLSubjectHierarchyNode.h", "vtkIdType GetItemByDataNode(vtkMRMLNode* dataNode);", ""),
    "GetItemParent": ("vtkMRMLSubjectHierarchyNode", MRML + "vtkMRMLSubjectHierarchyNode.h", "vtkIdType GetItemParent(vtkIdType itemID);", ""),
    "SetItemParent": ("vtkMRMLSubjectHierarchyNode", MRML + "vtkMRMLSubjectHierarchyNode.h", "void SetItemParent(vtkIdType itemID, vtkIdType parentItemID, bool enableCircularCheck=true);", ""),
    "GetSceneItemID": ("vtkMRMLSubjectHierarchyNode", MRML + "vtkMRMLSubjectHierarchyNode.h", "vtkIdType GetSceneItemID();", ""),
    "CreateItem": ("vtkMRMLSubjectHierarchyNode", MRML + "vtkMRMLSubjectHierarchyNode.h", "vtkIdType CreateItem(vtkIdType parentItemID, vtkMRMLNode* dataNode, const char* ownerPluginName=nullptr);", ""),
}

# Python-level calls of the application (slicer.util / slicer.app / parameter wrapper / SampleData)
PYTHON: dict[str, tuple[str, str, str]] = {
    "slicer.util.loadUI": (UTIL, "def loadUI(path):", ""),
    "slicer.util.childWidgetVariables": (UTIL, "def childWidgetVariables(widget):", ""),
    "slicer.util.tryWithErrorDisplay": (UTIL, "def tryWithErrorDisplay(message=None, show=True, waitCursor=False):", ""),
    "slicer.util.errorDisplay": (UTIL, "def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):", ""),
    "slicer.util.confirmOkCancelDisplay": (UTIL, "def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):", ""),
    "slicer.util.pip_install": (UTIL, "def pip_install(requirements, **kwargs):", "before 5.12 (pip_ensure from 5.12 is probed)"),
    "slicer.util.resetSliceViews": (UTIL, "def resetSliceViews():", ""),
    "slicer.util.startupEnvironment": (UTIL, "def startupEnvironment():", "what launchConsoleProcess uses"),
    "slicer.app.connect": ("Base/QTGUI/qSlicerApplication.h", "void startupCompleted();  (signal)", "template's registerSampleData"),
    "slicer.app.testingEnabled": ("Base/QTCore/qSlicerCoreApplication.h", "Q_INVOKABLE bool testingEnabled()const;", ""),
    "connectParametersToGui": ("Base/Python/slicer/parameterNodeWrapper/wrapper.py",
                               'checkedSetAttr(classtype, "connectParametersToGui", _connectParametersToGui)',
                               "returns the tag on 5.8.0/5.8.1, where connectGui returns None"),
    "disconnectGui": ("Base/Python/slicer/parameterNodeWrapper/wrapper.py",
                      'checkedSetAttr(classtype, "disconnectGui", _disconnectGui)', ""),
    "registerCustomSampleDataSource": ("Modules/Scripted/SampleData/SampleData.py",
                                       "def registerCustomSampleDataSource(category=\"Custom\", … checksums=None, …",
                                       "checksums keyword present"),
    "installTorch": ("fepegar/SlicerPyTorch: PyTorchUtils/PyTorchUtils.py",
                     "def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):",
                     "the PyTorch extension"),
}

#: Calls that do not exist on Slicer 5.8 (added in 5.10, Slicer commit 49a2510): never to be made.
NEW_IN_5_10 = {"SetTerminology", "GetTerminology"}

#: UpperCamel calls in the scanned files that are not Slicer's: VTK core, SimpleITK, Qt classes.
NOT_SLICER = {"GetElement", "SetElement", "GetPointData", "GetScalars", "SetScalars", "SetDimensions", "GetDimensions",
              "GetNumberOfScalarComponents", "ShallowCopy", "SetRange", "GetArrayFromImage", "GetImageFromArray",
              "GetSpacing", "SetSpacing", "GetOrigin", "SetOrigin", "GetDirection", "SetDirection",
              "GetNumberOfComponentsPerPixel", "PyTorchUtilsLogic"}
